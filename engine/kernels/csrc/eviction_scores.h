// One query row's H2O / Keyformer score contribution, shared by the score
// kernel (eviction_scores_cpu.cpp), the scored prompt attention
// (prefill_scored_cpu.cpp) and the decode score op (decode_scores_cpu.cpp).
//
// Keyformer's Gumbel noise is a splitmix64 hash of (seed, layer, query head,
// query position, key position) whose top bits index a table of Gumbel(0, 1)
// levels. It must equal kv_manager.scoring.gumbel_noise bit for bit: the same
// constants, the same hash and the same table.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>

#include "vector_math.h"

namespace keyserve::scores {

// The constants of kv_manager/scoring.py.
constexpr uint64_t kSeed = 0x9E3779B97F4A7C15ULL;
constexpr uint64_t kLayer = 0xBF58476D1CE4E5B9ULL;
constexpr uint64_t kHead = 0x94D049BB133111EBULL;
constexpr uint64_t kQueryPos = 0xD6E8FEB86659FD93ULL;
constexpr uint64_t kKeyPos = 0xA0761D6478BD642FULL;
constexpr uint64_t kMix1 = 0xBF58476D1CE4E5B9ULL;
constexpr uint64_t kMix2 = 0x94D049BB133111EBULL;

#pragma omp declare simd notinbranch
inline uint64_t finalize(uint64_t x) {
  x = (x ^ (x >> 30)) * kMix1;
  x = (x ^ (x >> 27)) * kMix2;
  return x ^ (x >> 31);
}

// The hash's seed, layer and query-head terms.
inline uint64_t head_term(int64_t seed, int64_t layer, int64_t head) {
  return static_cast<uint64_t>(seed) * kSeed + static_cast<uint64_t>(layer) * kLayer +
         static_cast<uint64_t>(head) * kHead;
}

inline uint64_t query_term(int64_t query_pos) {
  return static_cast<uint64_t>(query_pos) * kQueryPos;
}

inline uint64_t key_term(int64_t key_pos) { return static_cast<uint64_t>(key_pos) * kKeyPos; }

// An input of the score ops: a contiguous CPU tensor of one type and shape.
inline void check_input(const at::Tensor& t, at::ScalarType type, at::IntArrayRef shape,
                        const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == type && t.is_contiguous() &&
                  t.sizes() == shape,
              what);
}

// Checks the Gumbel table (float32, a power-of-two size); returns the shift
// s such that hash >> s indexes it (and its table of exponentials).
inline int check_noise_table(const at::Tensor& noise_table) {
  const int64_t size = noise_table.numel();
  TORCH_CHECK(noise_table.device().is_cpu() && size > 1 && (size & (size - 1)) == 0 &&
                  noise_table.scalar_type() == at::kFloat && noise_table.is_contiguous(),
              "noise_table: contiguous float32 of a power-of-two size");
  return 64 - static_cast<int>(std::log2(static_cast<double>(size)));
}

// The optional table of exponentials: empty, or float32 the size of noise_table.
inline void check_exp_table(const at::Tensor& exp_table, const at::Tensor& noise_table) {
  TORCH_CHECK(exp_table.numel() == 0 ||
                  (exp_table.device().is_cpu() && exp_table.numel() == noise_table.numel() &&
                   exp_table.scalar_type() == at::kFloat && exp_table.is_contiguous()),
              "exp_table: empty, or contiguous float32 the size of noise_table");
}

// What one (sequence, KV head, query head) work item reads besides its rows.
struct Noise {
  const float* table;        // Gumbel levels
  const float* exp_table;    // their exponentials, or null
  int shift;                 // hash >> shift indexes both tables
  bool on;
  uint64_t base;             // head_term(seed, layer, head)
  const uint64_t* key_hash;  // [S]: each key's key_term, made once per item
};

// row[j] += softmax((x + g) / tau)_j over the n visible keys (the general
// score; x is left as it is). z: scratch of n floats.
inline void add_tempered(const float* x, int64_t n, float tau, uint64_t qbase,
                         const Noise& noise, float* row, float* z) {
  const float inv_tau = 1.f / tau;
  if (noise.on) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      z[j] = (x[j] + noise.table[finalize(qbase + noise.key_hash[j]) >> noise.shift]) * inv_tau;
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) z[j] = x[j] * inv_tau;
  }
  const float inv_sum = 1.f / exp_shifted(z, z, n, max_of(z, n));
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) row[j] += z[j] * inv_sum;
}

// row[j] += softmax(x + g)_j from e = c * exp(x) for any c > 0 (the
// probabilities, or the exponentials before they are normalized): e_j e^g_j,
// normalized. Needs noise.exp_table.
inline void add_noisy_from_exp(const float* e, int64_t n, uint64_t qbase, const Noise& noise,
                               float* row, float* z) {
  // The sum in a loop of its own: kept in the gather loop (an omp simd
  // reduction), a 2,048-token keyformer prompt layer took 55 against 41 ms.
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    z[j] = e[j] * noise.exp_table[finalize(qbase + noise.key_hash[j]) >> noise.shift];
  }
  const float inv_sum = 1.f / sum_of(z, n);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) row[j] += z[j] * inv_sum;
}

}  // namespace keyserve::scores
