// The slot each (sequence, layer, KV head) evicts when a score-based policy
// (H2O, Keyformer) is one slot over its budget, the common decode step: the
// lowest accumulated score outside the recent window, the oldest position
// among equals (the rule of kv_manager's select_victims). In torch that is a
// gather of every slot's score and position into [B, L, Hkv, S] and five
// passes over it; here it is one pass over the cache in place.
//
// Op: keyserve::lowest_priority_slots(
//     scores [L, N, Hkv] float, positions [L, N, Hkv] int32 (N: physical slots),
//     slots [B, S] int64 (each sequence's physical slots, in order),
//     counts [B] int64 (its slots in use), recent_start [B] int64 (positions
//     at or past it are in the window, never evicted)) -> [B, L, Hkv] int64,
//     the victim's index into its sequence's row of `slots`.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <vector>

namespace {

at::Tensor lowest_priority_slots(const at::Tensor& scores, const at::Tensor& positions,
                                 const at::Tensor& slots, const at::Tensor& counts,
                                 const at::Tensor& recent_start) {
  TORCH_CHECK(scores.dim() == 3 && scores.scalar_type() == at::kFloat && scores.is_contiguous(),
              "scores: contiguous float32 [L, N, Hkv]");
  TORCH_CHECK(positions.sizes() == scores.sizes() && positions.scalar_type() == at::kInt &&
                  positions.is_contiguous(),
              "positions: contiguous int32, shaped like scores");
  TORCH_CHECK(slots.dim() == 2 && slots.scalar_type() == at::kLong && slots.is_contiguous(),
              "slots: contiguous int64 [B, S]");
  const int64_t L = scores.size(0), N = scores.size(1), H = scores.size(2);
  const int64_t B = slots.size(0), S = slots.size(1);
  for (const auto* t : {&counts, &recent_start}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == B && t->scalar_type() == at::kLong &&
                    t->is_contiguous(),
                "counts, recent_start: contiguous int64 [B]");
  }
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t* count = counts.data_ptr<int64_t>();
  const int64_t* start = recent_start.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(count[b] >= 1 && count[b] <= S, "counts must be in [1, S]");
    for (int64_t i = 0; i < count[b]; ++i) {
      TORCH_CHECK(slot[b * S + i] >= 0 && slot[b * S + i] < N, "a slot outside the cache");
    }
  }
  at::Tensor out = at::empty({B, L, H}, slots.options());
  const float* score = scores.data_ptr<float>();
  const int32_t* position = positions.data_ptr<int32_t>();
  int64_t* victim = out.data_ptr<int64_t>();
  constexpr float kInf = std::numeric_limits<float>::infinity();

  // One work item per (sequence, layer): disjoint output rows.
  at::parallel_for(0, B * L, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> best_priority(H);
    std::vector<int32_t> best_position(H);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / L, l = item % L;
      const float* sc = score + l * N * H;
      const int32_t* pos = position + l * N * H;
      int64_t* row = victim + item * H;
      std::fill(best_priority.begin(), best_priority.end(), kInf);
      std::fill(best_position.begin(), best_position.end(), std::numeric_limits<int32_t>::max());
      std::fill(row, row + H, int64_t{0});
      for (int64_t i = 0; i < count[b]; ++i) {
        const int64_t base = slot[b * S + i] * H;
        for (int64_t h = 0; h < H; ++h) {
          const int32_t p = pos[base + h];
          const float priority = p >= start[b] ? kInf : sc[base + h];
          if (priority < best_priority[h] ||
              (priority == best_priority[h] && p < best_position[h])) {
            best_priority[h] = priority;
            best_position[h] = p;
            row[h] = i;
          }
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(keyserve, m) {
  m.def(
      "lowest_priority_slots(Tensor scores, Tensor positions, Tensor slots, Tensor counts, "
      "Tensor recent_start) -> Tensor");
}

TORCH_LIBRARY_IMPL(keyserve, CPU, m) {
  m.impl("lowest_priority_slots", &lowest_priority_slots);
}
