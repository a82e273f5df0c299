// Decode attention's inner loops for bfloat16 caches on a CPU with
// AVX-512-BF16 (paged_attention_cpu.cpp's generic loops widen every K and V
// element to float32 instead).
//
// One query row per head makes decode a matrix-vector product, and the
// generic code spent most of its time on bookkeeping rather than on the
// products: a horizontal sum per key and query head for q.k, and per key two
// widening instructions per 16 values plus one float32 FMA per value for
// P V. Here:
// - q.k: VDPBF16PS gives each key a vector of 16 partial sums; 16 keys'
//   vectors are summed lane-wise by a transpose-and-add tree (45 shuffles
//   and adds for 16 keys, where one horizontal sum per key takes 8).
// - P V: two adjacent keys' value rows are interleaved in registers
//   (VPUNPCK{L,H}WD), so VDPBF16PS adds both keys' products per dimension in
//   one instruction against a broadcast pair of probabilities. The
//   probabilities are rounded to bf16 for it, as the prompt kernels and
//   flash-attention do (the normalizer stays the float32 sum of the
//   unrounded ones). The interleave leaves the dimensions of each 32-value
//   chunk in an order of its own in the accumulators; interleaved_slot
//   maps them back once per head at the end.
#pragma once

#if defined(__AVX512BF16__)

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "bf16.h"

namespace keyserve::decode::dot {

constexpr int64_t kKeysPerTree = 16;

// The 16 lane sums of v[0..16) as one vector (lane i: the sum of v[i]).
inline __m512 sum_lanes16(__m512 v[16]) {
  __m512 pairs[8], quads[4], octs[2];
  for (int i = 0; i < 8; ++i) {  // each 128-bit chunk: 2 partial sums of v[2i], v[2i+1]
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                             _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  }
  for (int i = 0; i < 4; ++i) {  // each chunk: one partial sum of each of 4 vectors
    const __m512d a = _mm512_castps_pd(pairs[2 * i]), b = _mm512_castps_pd(pairs[2 * i + 1]);
    quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  for (int i = 0; i < 2; ++i) {  // chunks: halves of the sums of 4 vectors, twice
    octs[i] = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], 0x88),
                            _mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], 0xdd));
  }
  return _mm512_add_ps(_mm512_shuffle_f32x4(octs[0], octs[1], 0x88),
                       _mm512_shuffle_f32x4(octs[0], octs[1], 0xdd));
}

// Memory to ask for while a block is computed: `bytes` of K from k on
// (during the q.k pass) and as many of V from v on (during the P V pass),
// each spread evenly over its pass rather than asked for at once: a burst of
// a whole block's lines fills the core's miss buffers and stalls the
// arithmetic until they drain, so that reading and computing took turns
// (measured on the 2-core EPYC: 16 sequences x 576 keys x 30 layers, one
// thread, 28 -> 22 ms a step; spreading K and V over their own passes took
// 64 sequences on 2 threads from 43 to 34.5 ms).
struct Prefetch {
  const char* k;
  const char* v;
  int64_t bytes;
};

// The dot products of one query row (C chunks of 32 values) with `n` (at
// most 16) key rows k + i * stride, as 16 lanes (zero past n). With n = 16,
// the common case, the loop unrolls whole and the partial sums stay in
// registers.
template <int64_t C>
inline __m512 tree_of_keys(const __m512bh* qv, const bf16* k, int64_t stride, int64_t n) {
  __m512 partial[kKeysPerTree];
  if (n == kKeysPerTree) {
#pragma GCC unroll 16
    for (int64_t i = 0; i < kKeysPerTree; ++i) {
      const bf16* row = k + i * stride;
      __m512 acc = _mm512_setzero_ps();
      for (int64_t c = 0; c < C; ++c)
        acc = _mm512_dpbf16_ps(acc, qv[c], (__m512bh)_mm512_loadu_si512(row + 32 * c));
      partial[i] = acc;
    }
  } else {
    for (int64_t i = 0; i < kKeysPerTree; ++i) {
      partial[i] = _mm512_setzero_ps();
      for (int64_t c = 0; i < n && c < C; ++c)
        partial[i] = _mm512_dpbf16_ps(
            partial[i], qv[c], (__m512bh)_mm512_loadu_si512(k + i * stride + 32 * c));
    }
  }
  return sum_lanes16(partial);
}

// Asks for the next `lines` lines from `from + cursor` on, up to `bytes`.
inline void prefetch_lines(const char* from, int64_t bytes, int64_t& cursor, int64_t lines) {
  for (int64_t l = 0; l < lines && cursor < bytes; ++l, cursor += 64)
    __builtin_prefetch(from + cursor, 0, 1);
}

// Lines per step for `bytes` spread evenly over `steps` steps.
inline int64_t lines_per_step(int64_t bytes, int64_t steps) {
  return steps > 0 ? (bytes / 64 + steps - 1) / steps : 0;
}

// scores[g * count + i] = scale * q[g] . k_i for G query rows q [G, D]
// against `count` key rows k + i * stride.
template <int64_t D>
void key_scores(const bf16* q, const bf16* k, int64_t stride, int64_t count, int64_t G,
                float scale, float* scores, Prefetch ahead) {
  constexpr int64_t C = D / 32;
  const __m512 s = _mm512_set1_ps(scale);
  // The prefetches, an even share per 16 keys and query row, ending by the
  // last tree of keys.
  const int64_t trees = (count + kKeysPerTree - 1) / kKeysPerTree;
  const int64_t quota = lines_per_step(ahead.bytes, trees * G);
  int64_t cursor = 0;
  for (int64_t i0 = 0; i0 < count; i0 += kKeysPerTree) {
    const int64_t n = std::min(kKeysPerTree, count - i0);
    const __mmask16 keep = n == kKeysPerTree ? 0xffff : (1u << n) - 1;
    for (int64_t g = 0; g < G; ++g) {
      prefetch_lines(ahead.k, ahead.bytes, cursor, quota);
      __m512bh qv[C];
      for (int64_t c = 0; c < C; ++c) qv[c] = (__m512bh)_mm512_loadu_si512(q + g * D + 32 * c);
      const __m512 sums = tree_of_keys<C>(qv, k + i0 * stride, stride, n);
      _mm512_mask_storeu_ps(scores + g * count + i0, keep, _mm512_mul_ps(sums, s));
    }
  }
}

// p [G][count] float32 -> [G][pairs] words of two adjacent keys'
// probabilities rounded to bf16 (a zero after an odd count's last key).
inline void pair_probabilities(const float* p, int64_t count, int64_t G, int64_t pairs,
                               uint32_t* out) {
  for (int64_t g = 0; g < G; ++g) {
    const float* row = p + g * count;
    uint32_t* dst = out + g * pairs;
    for (int64_t j = 0; j < 2 * pairs; j += 32) {
      const int64_t left = count - j;
      const __mmask16 lo = left >= 16 ? 0xffff : left <= 0 ? 0 : (1u << left) - 1;
      const __mmask16 hi = left >= 32 ? 0xffff : left <= 16 ? 0 : (1u << (left - 16)) - 1;
      const __m512bh packed = _mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(hi, row + j + 16),
                                                  _mm512_maskz_loadu_ps(lo, row + j));
      const int64_t words = std::min<int64_t>(16, pairs - j / 2);
      _mm512_mask_storeu_epi32(dst + j / 2, words == 16 ? 0xffff : (1u << words) - 1,
                               (__m512i)packed);
    }
  }
}

// acc[r] = acc[r] * rescale[r] + sum_j p[r][j] v_j for R query rows over
// `count` value rows v + j * stride; p: [R][pairs] words (pair_probabilities),
// rows `pairs` words apart; acc in the interleaved order (see the top).
template <int64_t D, int R>
void accumulate_rows(const uint32_t* p, int64_t pairs, const float* rescale, const bf16* v,
                     int64_t stride, int64_t count, float* acc, Prefetch ahead) {
  constexpr int64_t C = D / 32;
  __m512 lo[R][C], hi[R][C];
  for (int r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c) {
      const __m512 f = _mm512_set1_ps(rescale[r]);
      lo[r][c] = _mm512_mul_ps(_mm512_loadu_ps(acc + r * D + 32 * c), f);
      hi[r][c] = _mm512_mul_ps(_mm512_loadu_ps(acc + r * D + 32 * c + 16), f);
    }
  const int64_t quota = lines_per_step(ahead.bytes, pairs);
  int64_t cursor = 0;
  for (int64_t i = 0; i < pairs; ++i) {
    prefetch_lines(ahead.v, ahead.bytes, cursor, quota);
    const bf16* even = v + 2 * i * stride;
    const bool has_odd = 2 * i + 1 < count;  // past the last key: zeros, never memory
    __m512bh pp[R];
    for (int r = 0; r < R; ++r) pp[r] = (__m512bh)_mm512_set1_epi32(p[r * pairs + i]);
    for (int64_t c = 0; c < C; ++c) {
      const __m512i a = _mm512_loadu_si512(even + 32 * c);
      const __m512i b =
          has_odd ? _mm512_loadu_si512(even + stride + 32 * c) : _mm512_setzero_si512();
      const __m512bh low = (__m512bh)_mm512_unpacklo_epi16(a, b);
      const __m512bh high = (__m512bh)_mm512_unpackhi_epi16(a, b);
      for (int r = 0; r < R; ++r) {
        lo[r][c] = _mm512_dpbf16_ps(lo[r][c], pp[r], low);
        hi[r][c] = _mm512_dpbf16_ps(hi[r][c], pp[r], high);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c) {
      _mm512_storeu_ps(acc + r * D + 32 * c, lo[r][c]);
      _mm512_storeu_ps(acc + r * D + 32 * c + 16, hi[r][c]);
    }
}

// Query rows per register block: 2 * R * C accumulators, R broadcasts and
// two interleaved value vectors within the 32 vector registers.
template <int64_t D>
constexpr int kValueRows = D == 64 ? 4 : 2;

// The last `rest` rows (fewer than M + 1) in one pass where M allows: a
// group of 3 (SmolLM2-135M) reads V once, not three times.
template <int64_t D, int M>
void accumulate_rest(const uint32_t* p, int64_t pairs, const float* rescale, const bf16* v,
                     int64_t stride, int64_t count, int64_t rest, float* acc, Prefetch ahead) {
  if constexpr (M > 0) {
    if (rest == M) return accumulate_rows<D, M>(p, pairs, rescale, v, stride, count, acc, ahead);
    accumulate_rest<D, M - 1>(p, pairs, rescale, v, stride, count, rest, acc, ahead);
  }
}

template <int64_t D>
void accumulate_values(const uint32_t* p, int64_t pairs, const float* rescale, const bf16* v,
                       int64_t stride, int64_t count, int64_t G, float* acc, Prefetch ahead) {
  constexpr int R = kValueRows<D>;
  int64_t g = 0;
  for (; g + R <= G; g += R, ahead.bytes = 0)  // the first pass over V asks for the next
    accumulate_rows<D, R>(p + g * pairs, pairs, rescale + g, v, stride, count, acc + g * D,
                          ahead);
  accumulate_rest<D, R - 1>(p + g * pairs, pairs, rescale + g, v, stride, count, G - g,
                            acc + g * D, ahead);
}

// Where dimension d of a row sits in the interleaved accumulators: within
// each 32-value chunk, VPUNPCKLWD took dimensions 8L..8L+3 of each 128-bit
// lane L into float lanes 4L..4L+3 of the first vector, VPUNPCKHWD
// dimensions 8L+4..8L+7 into the same lanes of the second.
constexpr int64_t interleaved_slot(int64_t d) {
  const int64_t chunk = d / 32, r = d % 32, lane = r / 8, w = r % 8;
  return 32 * chunk + (w < 4 ? 0 : 16) + 4 * lane + w % 4;
}

}  // namespace keyserve::decode::dot

#endif  // __AVX512BF16__
