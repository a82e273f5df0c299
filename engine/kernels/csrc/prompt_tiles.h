// The float32 tile micro-kernels that both prompt attention kernels are
// built from (prefill_attention_cpu.cpp, prefill_scored_cpu.cpp): a tile of
// query rows (all G query heads of one KV head, so GQA shares every K and V
// load) against 64 keys at a time. K is transposed once per 64-key tile so
// that the scores of 64 keys are 4 vector FMAs per query dimension; P @ V
// reads V row by row in its cache layout. Inputs are float or bf16 (bf16.h:
// widened as they are read); prompt_paths.h picks these or the AVX-512-BF16
// ones (prompt_tiles_bf16.h) per element type.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>

#include "bf16.h"
#include "vector_math.h"

namespace keyserve::prompt {

constexpr int64_t kKeys = 64;     // keys per tile: 4 vectors of scores per query row
constexpr int64_t kQueries = 16;  // query positions per tile (times G heads)
constexpr int64_t kKeyVecs = kKeys / 16;

// scores[m * out_stride + [0, 64)] = q[m] . kt[:, 0, 64) for R query rows
// (kt: [D][kKeys]): 4 x R accumulators, one broadcast per row and dimension,
// K loaded once for all R rows.
template <int64_t D, int R>
inline void score_rows(const float* q, const float* kt, float* scores, int64_t out_stride) {
  f32x16 acc[R][kKeyVecs] = {};
  for (int64_t d = 0; d < D; ++d) {
    f32x16 kv[kKeyVecs];
    for (int64_t c = 0; c < kKeyVecs; ++c) kv[c] = load16(kt + d * kKeys + 16 * c);
    for (int r = 0; r < R; ++r) {
      const float qd = q[r * D + d];
      for (int64_t c = 0; c < kKeyVecs; ++c) acc[r][c] += qd * kv[c];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int64_t c = 0; c < kKeyVecs; ++c) store16(scores + r * out_stride + 16 * c, acc[r][c]);
}

// The tile's rows in register blocks of 4, then one at a time for the tail.
template <int64_t D>
void score_tile(const float* q, const float* kt, float* scores, int64_t out_stride,
                int64_t rows) {
  int64_t m = 0;
  for (; m + 4 <= rows; m += 4)
    score_rows<D, 4>(q + m * D, kt, scores + m * out_stride, out_stride);
  for (; m < rows; ++m) score_rows<D, 1>(q + m * D, kt, scores + m * out_stride, out_stride);
}

// Rows per register block: R x (accumulator vectors) within 16 registers.
template <int64_t D>
constexpr int kValueRows = D == 64 ? 4 : 2;

// acc[m] = acc[m] * rescale[m] + p[m] @ V[0, count) for each row m (p's rows
// p_stride apart). V: float or bf16.
template <int64_t D, typename V>
void accumulate_tile(const float* p, int64_t p_stride, const float* rescale, const V* v,
                     int64_t v_stride, int64_t count, float* acc, int64_t rows) {
  constexpr int R = kValueRows<D>;
  int64_t m = 0;
  for (; m + R <= rows; m += R)
    accumulate_values<D, R>(p + m * p_stride, p_stride, rescale + m, v, v_stride, count,
                            acc + m * D);
  for (; m < rows; ++m)
    accumulate_values<D, 1>(p + m * p_stride, p_stride, rescale + m, v, v_stride, count,
                            acc + m * D);
}

// rows[g * nq + r] = scale * q[i0 + r, head h * G + g] for the tile's
// queries, as float (T: float or bf16).
template <int64_t D, typename T>
void load_queries(const T* q, int64_t q_stride, int64_t h, int64_t G, int64_t i0, int64_t nq,
                  float scale, float* rows) {
  for (int64_t g = 0; g < G; ++g)
    for (int64_t r = 0; r < nq; ++r) {
      const T* src = q + (i0 + r) * q_stride + (h * G + g) * D;
      float* dst = rows + (g * nq + r) * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = to_f32(src[d]) * scale;
    }
}

// One word of a key row as the score tiles read it.
inline float key_word(float x) { return x; }
inline float key_word(bf16 x) { return to_f32(x); }
inline uint32_t key_word(uint32_t x) { return x; }

// Two adjacent bf16 read as one 32-bit word (may alias them, 2-byte aligned).
typedef uint32_t bf16_pair __attribute__((may_alias, aligned(2)));

// K [S, Hkv, W words per head] (rows `stride` words apart) ->
// [Hkv][tiles][W][64] of Out, zeros past S: a score tile reads 64 keys of
// one word as 4 vectors, and its words are contiguous (a [W][S] layout puts
// the W rows a power of two apart, into the same few L1 sets). float keys
// (W = D), bf16 ones widened (W = D), or pairs of bf16 dimensions as one
// 32-bit word (W = D / 2: the AVX-512-BF16 layout).
template <typename In, typename Out>
void transpose_keys(const In* src, int64_t stride, int64_t S, int64_t H, int64_t W, Out* dst) {
  const int64_t tiles = (S + kKeys - 1) / kKeys;
  at::parallel_for(0, H * tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t h = item / tiles, j0 = (item % tiles) * kKeys;
      Out* tile = dst + item * W * kKeys;
      for (int64_t j = 0; j < kKeys; ++j) {
        const In* row = src + (j0 + j) * stride + h * W;
        for (int64_t w = 0; w < W; ++w) {
          tile[w * kKeys + j] = j0 + j < S ? key_word(row[w]) : Out{};
        }
      }
    }
  });
}

// q, k, v or out: float32 or bfloat16 CPU [tokens, heads, D], each row's
// heads contiguous (rows may have a stride: views of a merged projection).
inline void check_token_rows(const at::Tensor& t, const char* name) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK(t.device().is_cpu() && (dtype == at::kFloat || dtype == at::kBFloat16) &&
                  t.dim() == 3,
              name, ": float32 or bfloat16 CPU [tokens, heads, D]");
  TORCH_CHECK(t.stride(2) == 1 && t.stride(1) == t.size(2), name,
              ": each row's heads must be contiguous");
}

// The checks both prompt kernels make of out, q, k and v.
inline void check_prompt_shapes(const at::Tensor& out, const at::Tensor& q, const at::Tensor& k,
                                const at::Tensor& v) {
  check_token_rows(out, "out");
  check_token_rows(q, "q");
  check_token_rows(k, "k");
  check_token_rows(v, "v");
  for (const auto* t : {&out, &k, &v}) {
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "out, q, k and v: one dtype");
  }
  TORCH_CHECK(out.sizes() == q.sizes(), "out must be shaped like q");
  TORCH_CHECK(v.sizes() == k.sizes() && k.size(2) == q.size(2), "k and v: [S, Hkv, D] like q's D");
  TORCH_CHECK(q.size(1) % k.size(1) == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(k.size(0) >= q.size(0), "fewer keys than queries");
  TORCH_CHECK(q.size(2) == 64 || q.size(2) == 128, "head size 64 or 128 only");
}

}  // namespace keyserve::prompt
