// The step's new K/V into their slots of the paged cache, in one op.
//
// In torch this is four scatters per layer (K, V, key positions, and zeroed
// scores for reused slots), each its own dispatch and, on long prompts, its
// own OpenMP region; at decode batch sizes the dispatch and thread wake-ups
// cost more than the copy. Here each new token's rows are copied once.
//
// Op: keyserve::write_kv(
//     k_cache, v_cache [NB, bs, Hkv, D] float32 or bfloat16, pos_cache,
//     score_cache [NB, bs, Hkv] (int32, float32), k, v [T, Hkv, D] of the
//     cache's dtype (rows may have a stride: views of a merged projection),
//     slots [T] int64 (physical slot of each token), positions [T] int64)
// The rows are copied as bytes: the dtype only sets their width.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace {

// Tokens per work item: a decode batch stays on one thread (no wake-up).
constexpr int64_t kTokenGrain = 64;

void check_cache(const at::Tensor& cache, at::ScalarType dtype, int64_t dims, const char* name) {
  TORCH_CHECK(cache.device().is_cpu() && cache.scalar_type() == dtype && cache.is_contiguous() &&
                  cache.dim() == dims,
              name, ": contiguous CPU cache of the expected dtype and rank");
}

void check_rows(const at::Tensor& x, const at::Tensor& cache, const char* name) {
  TORCH_CHECK(x.scalar_type() == cache.scalar_type() && x.dim() == 3, name,
              ": [T, Hkv, D] of the cache's dtype");
  TORCH_CHECK(x.size(1) == cache.size(2) && x.size(2) == cache.size(3), name,
              ": heads and head size must match the cache");
  TORCH_CHECK(x.stride(2) == 1 && x.stride(1) == x.size(2), name,
              ": each token's heads must be contiguous");
}

void write_kv(at::Tensor k_cache, at::Tensor v_cache, at::Tensor pos_cache,
              at::Tensor score_cache, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& slots, const at::Tensor& positions) {
  const auto dtype = k_cache.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "float32 or bfloat16 caches only");
  check_cache(k_cache, dtype, 4, "k_cache");
  check_cache(v_cache, dtype, 4, "v_cache");
  check_cache(pos_cache, at::kInt, 3, "pos_cache");
  check_cache(score_cache, at::kFloat, 3, "score_cache");
  check_rows(k, k_cache, "k");
  check_rows(v, v_cache, "v");
  const int64_t T = k.size(0), H = k.size(1), width = k.element_size();
  const int64_t row_bytes = H * k.size(2) * width;
  TORCH_CHECK(v.size(0) == T, "k and v differ in tokens");
  for (const auto* t : {&slots, &positions}) {
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous() && t->numel() == T,
                "slots, positions: contiguous int64 [T]");
  }
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(slot[t] >= 0 && slot[t] < num_slots, "slot ", slot[t], " outside the cache");
  }
  const int64_t* pos = positions.data_ptr<int64_t>();
  const char* kp = static_cast<const char*>(k.data_ptr());
  const char* vp = static_cast<const char*>(v.data_ptr());
  char* kc = static_cast<char*>(k_cache.data_ptr());
  char* vc = static_cast<char*>(v_cache.data_ptr());
  int32_t* pc = pos_cache.data_ptr<int32_t>();
  float* sc = score_cache.data_ptr<float>();
  const int64_t ks = k.stride(0) * width, vs = v.stride(0) * width;  // bytes
  at::parallel_for(0, T, kTokenGrain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t s = slot[t];
      std::memcpy(kc + s * row_bytes, kp + t * ks, row_bytes);
      std::memcpy(vc + s * row_bytes, vp + t * vs, row_bytes);
      // A slot may be reused from a freed block: its score starts afresh.
      std::fill(pc + s * H, pc + (s + 1) * H, static_cast<int32_t>(pos[t]));
      std::fill(sc + s * H, sc + (s + 1) * H, 0.f);
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(keyserve, m) {
  m.def(
      "write_kv(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!) pos_cache, "
      "Tensor(d!) score_cache, Tensor k, Tensor v, Tensor slots, Tensor positions) -> ()");
}

TORCH_LIBRARY_IMPL(keyserve, CPU, m) { m.impl("write_kv", &write_kv); }
