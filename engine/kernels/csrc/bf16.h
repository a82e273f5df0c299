// bfloat16 storage for the CPU kernels: caches and activations in bfloat16,
// arithmetic in float32.
//
// Widening is exact (a bfloat16 is the top half of a float32), so a kernel
// reads bfloat16 rows through these loads and runs its float32 code
// unchanged; only results are rounded back (to nearest even, as torch
// does). Plain vector extensions, like vector_math.h: they build for any
// x86 (or other) target. The AVX-512-BF16 dot products live beside the code
// that uses them, under #ifdef __AVX512BF16__.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <type_traits>

#include "vector_math.h"

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace keyserve {

// The bits of one bfloat16: layout-compatible with at::BFloat16 and
// __bf16, but a type of its own so that overloads pick the widening load.
struct bf16 {
  uint16_t bits;
};

typedef uint16_t u16x16 __attribute__((vector_size(32), aligned(2)));
typedef uint32_t u32x16 __attribute__((vector_size(64), aligned(4)));

inline float to_f32(bf16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.bits) << 16;
  float out;
  __builtin_memcpy(&out, &bits, sizeof(out));
  return out;
}

inline float to_f32(float x) { return x; }

// Round to nearest even; a NaN stays a (quiet) NaN rather than rounding
// into infinity.
inline bf16 to_bf16(float x) {
  uint32_t bits;
  __builtin_memcpy(&bits, &x, sizeof(bits));
  if (x != x) return bf16{0x7fc0};
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return bf16{static_cast<uint16_t>(bits >> 16)};
}

// 16 bfloat16 widened to float32.
inline f32x16 load16(const bf16* p) {
  u16x16 half;
  __builtin_memcpy(&half, p, sizeof(half));
  const u32x16 bits = __builtin_convertvector(half, u32x16) << 16;
  f32x16 out;
  __builtin_memcpy(&out, &bits, sizeof(out));
  return out;
}

#if defined(__AVX512BF16__)
// With AVX-512-BF16, rounding 16 values is one instruction (VCVTNEPS2BF16:
// nearest even, a NaN to a quiet NaN, as to_bf16) where the lanes take
// seven; the bf16 SwiGLU, for one, ran 1.3x faster with it. It flushes
// float32 denormals (below 1.2e-38) to a signed zero, where to_bf16 keeps
// them as bf16 denormals.
inline __m256i rounded_halves(f32x16 v) {
  __m512 x;
  __builtin_memcpy(&x, &v, sizeof(x));
  return (__m256i)_mm512_cvtneps_pbh(x);
}
#endif

// 16 float32 rounded to bfloat16 (the lanes' version of to_bf16).
inline void store16(bf16* p, f32x16 v) {
#if defined(__AVX512BF16__)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), rounded_halves(v));
#else
  u32x16 bits;
  __builtin_memcpy(&bits, &v, sizeof(bits));
  bits += 0x7fffu + ((bits >> 16) & 1u);
  const u32x16 quiet_nan = u32x16{} + 0x7fc00000u;
  bits = v != v ? quiet_nan : bits;
  const u16x16 half = __builtin_convertvector(bits >> 16, u16x16);
  __builtin_memcpy(p, &half, sizeof(half));
#endif
}

// float32 values rounded to bfloat16's precision but kept in float32: where
// a reference computes in bfloat16 op by op (each result rounded), a kernel
// rounds the same intermediates and keeps the rest of its float32 code.
inline f32x16 round_bf16(f32x16 v) {
#if defined(__AVX512BF16__)
  const __m512i bits = _mm512_slli_epi32(_mm512_cvtepu16_epi32(rounded_halves(v)), 16);
#else
  u32x16 bits;
  __builtin_memcpy(&bits, &v, sizeof(bits));
  bits = (bits + 0x7fffu + ((bits >> 16) & 1u)) & 0xffff0000u;
  const u32x16 quiet_nan = u32x16{} + 0x7fc00000u;
  bits = v != v ? quiet_nan : bits;
#endif
  f32x16 out;
  __builtin_memcpy(&out, &bits, sizeof(out));
  return out;
}

inline float round_bf16(float x) { return to_f32(to_bf16(x)); }

// dst[i] = src[i] for n values, widened or rounded as the types ask.
inline void convert_row(const bf16* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_f32(src[i]);
}

inline void convert_row(const float* src, bf16* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    store16(dst + i, load16(src + i));
  }
  for (; i < n; ++i) dst[i] = to_bf16(src[i]);
}

// A tensor's elements as T (bf16 is at::BFloat16's bits).
template <typename T>
T* elements(const at::Tensor& t) {
  if constexpr (std::is_same_v<T, bf16>) {
    return reinterpret_cast<bf16*>(t.data_ptr<at::BFloat16>());
  } else {
    return t.data_ptr<T>();
  }
}

}  // namespace keyserve
