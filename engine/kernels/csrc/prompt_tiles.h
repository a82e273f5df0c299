// The tile micro-kernels that both prompt attention kernels are built from
// (prefill_attention_cpu.cpp, prefill_scored_cpu.cpp): a tile of query rows
// (all G query heads of one KV head, so GQA shares every K and V load)
// against 64 keys at a time. K is transposed once per 64-key tile so that the
// scores of 64 keys are 4 vector FMAs per query dimension; P @ V reads V row
// by row in its cache layout.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>

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
// p_stride apart).
template <int64_t D>
void accumulate_tile(const float* p, int64_t p_stride, const float* rescale, const float* v,
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

// rows[g * nq + r] = scale * q[i0 + r, head h * G + g] for the tile's queries.
template <int64_t D>
void load_queries(const float* q, int64_t q_stride, int64_t h, int64_t G, int64_t i0,
                  int64_t nq, float scale, float* rows) {
  for (int64_t g = 0; g < G; ++g)
    for (int64_t r = 0; r < nq; ++r) {
      const float* src = q + (i0 + r) * q_stride + (h * G + g) * D;
      float* dst = rows + (g * nq + r) * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = src[d] * scale;
    }
}

// K [S, Hkv, D] (rows with a stride) -> [Hkv][tiles][D][64], zeros past S:
// a score tile reads 64 keys of one dimension as 4 vectors, and its 16 KB
// are contiguous (a [D][S] layout puts the D rows a power of two apart,
// into the same few L1 sets).
inline at::Tensor transpose_keys(const at::Tensor& k, int64_t D) {
  const int64_t S = k.size(0), H = k.size(1), tiles = (S + kKeys - 1) / kKeys;
  at::Tensor kt = at::empty({H, tiles, D, kKeys}, k.options());
  const float* src = k.data_ptr<float>();
  float* dst = kt.data_ptr<float>();
  const int64_t stride = k.stride(0);
  at::parallel_for(0, H * tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t h = item / tiles, j0 = (item % tiles) * kKeys;
      float* tile = dst + item * D * kKeys;
      for (int64_t j = 0; j < kKeys; ++j) {
        const float* row = src + (j0 + j) * stride + h * D;
        for (int64_t d = 0; d < D; ++d) tile[d * kKeys + j] = j0 + j < S ? row[d] : 0.f;
      }
    }
  });
  return kt;
}

// q, k, v or out: float32 CPU [tokens, heads, D], each row's heads contiguous
// (rows may have a stride: views of a merged projection).
inline void check_token_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 3, name,
              ": float32 CPU [tokens, heads, D]");
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
  TORCH_CHECK(out.sizes() == q.sizes(), "out must be shaped like q");
  TORCH_CHECK(v.sizes() == k.sizes() && k.size(2) == q.size(2), "k and v: [S, Hkv, D] like q's D");
  TORCH_CHECK(q.size(1) % k.size(1) == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(k.size(0) >= q.size(0), "fewer keys than queries");
  TORCH_CHECK(q.size(2) == 64 || q.size(2) == 128, "head size 64 or 128 only");
}

}  // namespace keyserve::prompt
