// Which tile micro-kernels the prompt kernels run for an element type, and
// the packed K and V they read. The kernels (prefill_attention_cpu.cpp,
// prefill_scored_cpu.cpp) are templates over the element type T and call
// only Path<T>:
// - float: float32 tiles (prompt_tiles.h), K transposed, V read in place.
// - bf16 with AVX-512-BF16: VDPBF16PS tiles (prompt_tiles_bf16.h), K and V
//   packed in pairs.
// - bf16 elsewhere (chosen at compile time, e.g. -mno-avx512f): the float32
//   tiles, K widened as it is transposed, V widened as it is read.
// Logits, softmax and accumulators are float32 on every path; only the
// output is rounded back to T.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "bf16.h"
#include "prompt_tiles.h"
#include "prompt_tiles_bf16.h"

namespace keyserve::prompt {

// K and V as a path's tiles read them; the tensors own the packed copies.
template <typename Key, typename Value>
struct Packed {
  at::Tensor keys, values;
  const Key* kt;        // [Hkv][key_tiles][words][64]
  const Value* v;       // value row j of head h: v + j * v_stride + h * v_head_stride
  int64_t v_stride, v_head_stride, key_tiles;
};

// The float32 tiles, over float or bf16 storage.
template <typename T>
struct WideningPath {
  using Query = float;  // the tile's query rows, pre-scaled
  using Key = float;
  using Value = T;

  static Packed<Key, Value> pack(const at::Tensor& k, const at::Tensor& v, int64_t D) {
    const int64_t S = k.size(0), H = k.size(1), tiles = (S + kKeys - 1) / kKeys;
    at::Tensor kt = at::empty({H, tiles, D, kKeys}, k.options().dtype(at::kFloat));
    transpose_keys(elements<T>(k), k.stride(0), S, H, D, kt.data_ptr<float>());
    return {kt, v, kt.data_ptr<float>(), elements<T>(v), v.stride(0), D, tiles};
  }

  template <int64_t D>
  static void load_queries(const T* q, int64_t q_stride, int64_t h, int64_t G, int64_t i0,
                           int64_t nq, float scale, float* rows) {
    prompt::load_queries<D>(q, q_stride, h, G, i0, nq, scale, rows);
  }

  template <int64_t D>
  static void score_tile(const float* q, const float* kt, float* scores, int64_t out_stride,
                         int64_t rows, float) {  // the scale is in q
    prompt::score_tile<D>(q, kt, scores, out_stride, rows);
  }

  template <int64_t D>
  static void accumulate_tile(const float* p, int64_t p_stride, const float* rescale,
                              const Value* v, int64_t v_stride, int64_t count, float* acc,
                              int64_t rows, bf16*) {
    prompt::accumulate_tile<D>(p, p_stride, rescale, v, v_stride, count, acc, rows);
  }
};

#if defined(__AVX512BF16__)
// bf16 through VDPBF16PS: queries stay bf16 (the scale goes on the sums).
struct DotPath {
  using Query = bf16;
  using Key = bf16;
  using Value = bf16;

  static Packed<Key, Value> pack(const at::Tensor& k, const at::Tensor& v, int64_t D) {
    const int64_t S = k.size(0), H = k.size(1), tiles = (S + kKeys - 1) / kKeys;
    TORCH_CHECK(k.stride(0) % 2 == 0, "bf16 k: rows an even number of elements apart");
    at::Tensor kt = at::empty({H, tiles, D / 2, kKeys, 2}, k.options());
    const auto* words = reinterpret_cast<const bf16_pair*>(elements<bf16>(k));
    transpose_keys(words, k.stride(0) / 2, S, H, D / 2,
                   reinterpret_cast<uint32_t*>(kt.data_ptr<at::BFloat16>()));
    const int64_t padded = tiles * kKeys;
    at::Tensor vp = at::empty({H, padded / 2, D, 2}, v.options());
    dot::pair_values(elements<bf16>(v), v.stride(0), S, H, D, padded, elements<bf16>(vp));
    return {kt, vp, elements<bf16>(kt), elements<bf16>(vp), D, padded * D, tiles};
  }

  template <int64_t D>
  static void load_queries(const bf16* q, int64_t q_stride, int64_t h, int64_t G, int64_t i0,
                           int64_t nq, float, bf16* rows) {
    for (int64_t g = 0; g < G; ++g)
      for (int64_t r = 0; r < nq; ++r) {
        const bf16* src = q + (i0 + r) * q_stride + (h * G + g) * D;
        std::copy(src, src + D, rows + (g * nq + r) * D);
      }
  }

  template <int64_t D>
  static void score_tile(const bf16* q, const bf16* kt, float* scores, int64_t out_stride,
                         int64_t rows, float scale) {
    dot::score_tile<D>(q, kt, scores, out_stride, rows, scale);
  }

  template <int64_t D>
  static void accumulate_tile(const float* p, int64_t p_stride, const float* rescale,
                              const bf16* v, int64_t, int64_t count, float* acc, int64_t rows,
                              bf16* scratch) {
    dot::accumulate_tile<D>(p, p_stride, rescale, v, count, acc, rows, scratch);
  }
};
#endif

template <typename T>
struct PathFor {
  using type = WideningPath<T>;
};

#if defined(__AVX512BF16__)
template <>
struct PathFor<bf16> {
  using type = DotPath;
};
#endif

template <typename T>
using Path = typename PathFor<T>::type;

// o[d] = a[d] * inv for D values, rounded to T.
template <int64_t D, typename T>
inline void store_output(const float* a, float inv, T* o) {
  for (int64_t d = 0; d < D; d += 16) store16(o + d, load16(a + d) * inv);
}

}  // namespace keyserve::prompt
