// A decode step's H2O / Keyformer scores, added straight into the paged
// score cache.
//
// The decode kernel hands back each scoring row's logits; what is left is,
// per (row, KV head), the noisy tempered softmax of each of its G query
// heads, summed over them, added to the score of the slot that holds each
// key. In torch that was a gather of the key positions from the position
// cache, a zeroed [b, Hkv, G, L] buffer, the score op, a sum over G and an
// index_put into the cache: five passes and as many parallel regions, every
// layer of every step. Here it is one: each work item reads its keys'
// positions through the slots and adds to those slots in place (slots are a
// row's own, and a KV head its own column, so no two items touch one score).
//
// Op: keyserve::add_decode_scores(
//     score_cache [N, Hkv] float (added to), logits [b, Hq, L] float,
//     key_slots [b, L] int64 (the slot of each row's key j), pos_cache
//     [N, Hkv] int32, num_keys [b] int64 (keys [0, n) are scored),
//     query_pos [b] int64, tau [b] float, seed [b] int64, use_noise [b] bool,
//     layer, noise_table [2^bits] float)

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "eviction_scores.h"

namespace {

using keyserve::scores::check_input;
using keyserve::scores::Noise;

void add_decode_scores(at::Tensor score_cache, const at::Tensor& logits,
                       const at::Tensor& key_slots, const at::Tensor& pos_cache,
                       const at::Tensor& num_keys, const at::Tensor& query_pos,
                       const at::Tensor& tau, const at::Tensor& seed,
                       const at::Tensor& use_noise, int64_t layer,
                       const at::Tensor& noise_table) {
  TORCH_CHECK(score_cache.dim() == 2 && logits.dim() == 3,
              "score_cache [N, Hkv], logits [b, Hq, L]");
  const int64_t N = score_cache.size(0), H = score_cache.size(1);
  const int64_t b = logits.size(0), Hq = logits.size(1), L = logits.size(2);
  TORCH_CHECK(Hq % H == 0, "query heads must be a multiple of KV heads");
  check_input(score_cache, at::kFloat, {N, H}, "score_cache: contiguous float32 [N, Hkv]");
  check_input(logits, at::kFloat, {b, Hq, L}, "logits: contiguous float32 [b, Hq, L]");
  check_input(key_slots, at::kLong, {b, L}, "key_slots: contiguous int64 [b, L]");
  check_input(pos_cache, at::kInt, {N, H}, "pos_cache: contiguous int32 [N, Hkv]");
  check_input(num_keys, at::kLong, {b}, "num_keys: contiguous int64 [b]");
  check_input(query_pos, at::kLong, {b}, "query_pos: contiguous int64 [b]");
  check_input(tau, at::kFloat, {b}, "tau: contiguous float32 [b]");
  check_input(seed, at::kLong, {b}, "seed: contiguous int64 [b]");
  check_input(use_noise, at::kBool, {b}, "use_noise: contiguous bool [b]");
  const int shift = keyserve::scores::check_noise_table(noise_table);
  const int64_t G = Hq / H;

  float* scores = score_cache.data_ptr<float>();
  const float* lp = logits.data_ptr<float>();
  const int64_t* slots = key_slots.data_ptr<int64_t>();
  const int32_t* positions = pos_cache.data_ptr<int32_t>();
  const int64_t* counts = num_keys.data_ptr<int64_t>();
  const int64_t* qpos = query_pos.data_ptr<int64_t>();
  const float* taus = tau.data_ptr<float>();
  const int64_t* seeds = seed.data_ptr<int64_t>();
  const bool* noisy = use_noise.data_ptr<bool>();
  for (int64_t r = 0; r < b; ++r) {
    TORCH_CHECK(counts[r] >= 0 && counts[r] <= L, "num_keys out of range");
    for (int64_t j = 0; j < counts[r]; ++j)
      TORCH_CHECK(slots[r * L + j] >= 0 && slots[r * L + j] < N, "key slot outside the cache");
  }

  at::parallel_for(0, b * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> total(L), z(L);
    std::vector<uint64_t> key_hash(L);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / H, h = item % H, n = counts[r];
      const int64_t* row_slots = slots + r * L;
      Noise noise{noise_table.data_ptr<float>(), nullptr, shift, noisy[r], 0, key_hash.data()};
      if (noise.on) {
        for (int64_t j = 0; j < n; ++j)
          key_hash[j] = keyserve::scores::key_term(positions[row_slots[j] * H + h]);
      }
      std::fill(total.begin(), total.begin() + n, 0.f);
      for (int64_t g = 0; g < G; ++g) {
        noise.base = keyserve::scores::head_term(seeds[r], layer, h * G + g);
        const uint64_t qbase = noise.base + keyserve::scores::query_term(qpos[r]);
        keyserve::scores::add_tempered(lp + (r * Hq + h * G + g) * L, n, taus[r], qbase, noise,
                                       total.data(), z.data());
      }
      for (int64_t j = 0; j < n; ++j) scores[row_slots[j] * H + h] += total[j];
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(keyserve, m) {
  m.def(
      "add_decode_scores(Tensor(a!) score_cache, Tensor logits, Tensor key_slots, "
      "Tensor pos_cache, Tensor num_keys, Tensor query_pos, Tensor tau, Tensor seed, "
      "Tensor use_noise, int layer, Tensor noise_table) -> ()");
}

TORCH_LIBRARY_IMPL(keyserve, CPU, m) { m.impl("add_decode_scores", &add_decode_scores); }
