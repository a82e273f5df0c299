// The prompt kernels' tile micro-kernels for bfloat16 on a CPU with
// AVX-512-BF16 (prompt_tiles.h has the float32 ones they replace).
//
// VDPBF16PS multiplies 16 pairs of bf16 (exact products) and adds both into
// 16 float32 sums: one instruction per two dimensions where float32 takes
// one FMA per dimension, so the two products of attention, Q K^T and P V,
// take half the instructions. Both pair along the dimension that is summed:
// - Q K^T sums over D: K is transposed into [D / 2][64 keys] words, each
//   word two adjacent dimensions of one key (one 32-bit "column" per key),
//   and each query row broadcasts its pair of dimensions. The scale is
//   applied to the sums (q * scale in bf16 would round again).
// - P V sums over keys: V is packed into [keys / 2][D] words, each word one
//   dimension of two adjacent keys, and each row of P broadcasts the pair of
//   its probabilities for those keys, rounded to bf16 as flash-attention
//   kernels do for their matrix units (the row's sum, the normalizer, stays
//   the float32 sum of the unrounded values).
#pragma once

#if defined(__AVX512BF16__)

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstdint>

#include "bf16.h"

namespace keyserve::prompt::dot {

constexpr int64_t kTileKeys = 64;  // prompt_tiles.h's kKeys

inline __m512bh broadcast_pair(const bf16* p) {
  uint32_t word;
  __builtin_memcpy(&word, p, sizeof(word));
  return (__m512bh)_mm512_set1_epi32(static_cast<int>(word));
}

// scores[r * out_stride + [0, 64)] = scale * q[r] . k[0, 64) for R rows of
// D bf16 (q) against one key tile kt: [D / 2][64] words.
template <int64_t D, int R>
inline void score_rows(const bf16* q, const bf16* kt, float* scores, int64_t out_stride,
                       float scale) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t e = 0; e < D / 2; ++e) {
    __m512bh kv[4];
    for (int c = 0; c < 4; ++c) {
      kv[c] = (__m512bh)_mm512_loadu_si512(kt + e * 2 * kTileKeys + 32 * c);
    }
    for (int r = 0; r < R; ++r) {
      const __m512bh qq = broadcast_pair(q + r * D + 2 * e);
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], qq, kv[c]);
    }
  }
  const __m512 s = _mm512_set1_ps(scale);
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) {
      _mm512_storeu_ps(scores + r * out_stride + 16 * c, _mm512_mul_ps(acc[r][c], s));
    }
}

// The tile's rows in register blocks of 4 (16 accumulators), then one by one.
template <int64_t D>
void score_tile(const bf16* q, const bf16* kt, float* scores, int64_t out_stride, int64_t rows,
                float scale) {
  int64_t m = 0;
  for (; m + 4 <= rows; m += 4)
    score_rows<D, 4>(q + m * D, kt, scores + m * out_stride, out_stride, scale);
  for (; m < rows; ++m) score_rows<D, 1>(q + m * D, kt, scores + m * out_stride, out_stride, scale);
}

// acc[r] = acc[r] * rescale[r] + sum over `pairs` key pairs of p[r] . v, for
// R rows: p rows of bf16 probabilities p_stride apart, v: [pairs][D] words.
template <int64_t D, int R>
inline void accumulate_rows(const bf16* p, int64_t p_stride, const float* rescale, const bf16* v,
                            int64_t pairs, float* acc) {
  constexpr int64_t C = D / 16;
  __m512 a[R][C];
  for (int r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c) {
      a[r][c] = _mm512_mul_ps(_mm512_loadu_ps(acc + r * D + 16 * c), _mm512_set1_ps(rescale[r]));
    }
  for (int64_t i = 0; i < pairs; ++i) {
    __m512bh pp[R];
    for (int r = 0; r < R; ++r) pp[r] = broadcast_pair(p + r * p_stride + 2 * i);
    for (int64_t c = 0; c < C; ++c) {
      const __m512bh vv = (__m512bh)_mm512_loadu_si512(v + i * 2 * D + 32 * c);
      for (int r = 0; r < R; ++r) a[r][c] = _mm512_dpbf16_ps(a[r][c], pp[r], vv);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c) _mm512_storeu_ps(acc + r * D + 16 * c, a[r][c]);
}

// Rows per register block: R x (D / 16) accumulators, R broadcasts and one
// value vector within the 32 vector registers.
template <int64_t D>
constexpr int kValueRows = D == 64 ? 4 : 3;

// p [rows][0, count) float32 (rows p_stride apart) -> out [rows][64] bf16,
// zero from count on: a pair that straddles count reads a zero.
inline void round_probabilities(const float* p, int64_t p_stride, int64_t count, int64_t rows,
                                bf16* out) {
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t c = 0; c < kTileKeys / 16; ++c) {
      const int64_t left = count - 16 * c;
      const __mmask16 keep = left >= 16 ? 0xffff : left <= 0 ? 0 : (1u << left) - 1;
      const __m512 x = _mm512_maskz_loadu_ps(keep, p + m * p_stride + 16 * c);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + m * kTileKeys + 16 * c),
                          (__m256i)_mm512_cvtneps_pbh(x));
    }
}

// acc[m] = acc[m] * rescale[m] + p[m] @ V[0, count) for each row m, as
// prompt_tiles.h's accumulate_tile; v: the tile's key pairs in [keys / 2][D]
// words, zero past the last key; scratch: rows x 64 bf16.
template <int64_t D>
void accumulate_tile(const float* p, int64_t p_stride, const float* rescale, const bf16* v,
                     int64_t count, float* acc, int64_t rows, bf16* scratch) {
  round_probabilities(p, p_stride, count, rows, scratch);
  constexpr int R = kValueRows<D>;
  const int64_t pairs = (count + 1) / 2;
  int64_t m = 0;
  for (; m + R <= rows; m += R)
    accumulate_rows<D, R>(scratch + m * kTileKeys, kTileKeys, rescale + m, v, pairs, acc + m * D);
  for (; m < rows; ++m)
    accumulate_rows<D, 1>(scratch + m * kTileKeys, kTileKeys, rescale + m, v, pairs, acc + m * D);
}

// V [S, H, D] bf16 (rows `stride` apart) -> [H][padded / 2][D] words of two
// adjacent keys' values (zeros past S): what accumulate_tile reads.
inline void pair_values(const bf16* v, int64_t stride, int64_t S, int64_t H, int64_t D,
                        int64_t padded, bf16* out) {
  const int64_t pairs = padded / 2;
  at::parallel_for(0, H * pairs, 64, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t h = item / pairs, j = 2 * (item % pairs);
      const bf16* even = v + j * stride + h * D;
      const bf16* odd = even + stride;
      bf16* dst = out + item * 2 * D;
      for (int64_t d = 0; d < D; ++d) {
        dst[2 * d] = j < S ? even[d] : bf16{0};
        dst[2 * d + 1] = j + 1 < S ? odd[d] : bf16{0};
      }
    }
  });
}

}  // namespace keyserve::prompt::dot

#endif  // __AVX512BF16__
