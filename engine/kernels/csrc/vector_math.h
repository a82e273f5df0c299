// Small vector helpers shared by the CPU kernels.
//
// GCC/Clang vector extensions rather than intrinsics: one code path that the
// compiler lowers to whatever -march=native offers (AVX-512 here, AVX2 or SSE
// elsewhere), so the same source is exercised by the tests on every machine.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace keyserve {

// 16 floats; aligned(4) so that loads from any float address are allowed.
typedef float f32x16 __attribute__((vector_size(64), aligned(4)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));

inline f32x16 load16(const float* p) {
  f32x16 v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

inline void store16(float* p, f32x16 v) { __builtin_memcpy(p, &v, sizeof(v)); }

// The sum of the 16 lanes, by halving (a fixed order: results do not depend
// on the batch or the thread that computes them).
inline float sum16(f32x16 v) {
  const f32x8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                  __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const f32x4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

typedef int32_t i32x16 __attribute__((vector_size(64)));

// |v| lane by lane: the sign bit cleared (one AND, where a compare and a
// select take two and a negation).
inline f32x16 abs16(f32x16 v) {
  i32x16 bits;
  __builtin_memcpy(&bits, &v, sizeof(bits));
  bits &= 0x7fffffff;
  __builtin_memcpy(&v, &bits, sizeof(v));
  return v;
}

// exp(x) for the softmax's x <= 0, 16 lanes at a time in plain arithmetic
// (a loop calling a scalar exp does not vectorize, not even std::exp under
// `omp simd` without -ffast-math, which would also break the -inf handling
// elsewhere): 2^t = 2^k * 2^f with k = round(t), |f| <= 1/2, and 2^f by its
// Taylor series to the 6th power (relative error below 2e-8, under float32's
// rounding). Below -87, where exp(x) leaves float32's normal range, the
// result is 0: the clamp keeps 2^k's exponent field valid (k >= -126), and a
// flush rather than a denormal keeps the arithmetic fast.
inline f32x16 exp16_nonpositive(f32x16 x) {
  const f32x16 zero = {};
  f32x16 t = x * 1.44269504088896341f;  // log2(e)
  t = t < -126.f ? zero - 126.f : t;
  // Adding and taking away 1.5 * 2^23 rounds to the nearest integer.
  const f32x16 k = (t + 12582912.f) - 12582912.f;
  const f32x16 f = (t - k) * 0.693147180559945309f;  // ln 2
  f32x16 p = zero + 1.f / 720.f;
  p = p * f + 1.f / 120.f;
  p = p * f + 1.f / 24.f;
  p = p * f + 1.f / 6.f;
  p = p * f + 0.5f;
  p = p * f + 1.f;
  p = p * f + 1.f;
  const i32x16 bits = (__builtin_convertvector(k, i32x16) + 127) << 23;  // 2^k
  const f32x16 r = p * reinterpret_cast<const f32x16&>(bits);
  return x < -87.f ? zero : r;
}

// The same for one value (the lanes' formula, so a tail matches its vector).
inline float exp_nonpositive(float x) {
  f32x16 v = {};
  v[0] = x;
  return exp16_nonpositive(v)[0];
}

// max(x[0, n)), -inf for n = 0.
inline float max_of(const float* x, int64_t n) {
  f32x16 m = f32x16{} - __builtin_inff();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const f32x16 v = load16(x + j);
    m = v > m ? v : m;
  }
  float out = m[0];
  for (int i = 1; i < 16; ++i) out = std::max(out, m[i]);
  for (; j < n; ++j) out = std::max(out, x[j]);
  return out;
}

// x[0] + ... + x[n - 1], 16 lanes at a time.
inline float sum_of(const float* x, int64_t n) {
  f32x16 acc = {};
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) acc += load16(x + j);
  float sum = sum16(acc);
  for (; j < n; ++j) sum += x[j];
  return sum;
}

// dst[j] = exp(src[j] - m) for j < n (src may be dst); returns their sum.
inline float exp_shifted(const float* src, float* dst, int64_t n, float m) {
  f32x16 acc = {};
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const f32x16 e = exp16_nonpositive(load16(src + j) - m);
    store16(dst + j, e);
    acc += e;
  }
  float sum = sum16(acc);
  for (; j < n; ++j) {
    dst[j] = exp_nonpositive(src[j] - m);
    sum += dst[j];
  }
  return sum;
}

// P @ V for R query rows at once: acc[r] = acc[r] * rescale[r] + sum_j
// p[r * p_stride + j] * v_j over `count` value rows v + j * v_stride. The R
// accumulators of D floats stay in registers, and each value row is loaded
// once for all R rows (the query heads of a GQA group, or a tile of queries).
// V is float or bf16 (bf16.h): its load16 is found by argument-dependent lookup.
template <int64_t D, int R, typename V>
inline void accumulate_values(const float* p, int64_t p_stride, const float* rescale,
                              const V* v, int64_t v_stride, int64_t count, float* acc) {
  constexpr int64_t C = D / 16;
  f32x16 a[R][C];
  for (int r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c) a[r][c] = load16(acc + r * D + 16 * c) * rescale[r];
  for (int64_t j = 0; j < count; ++j) {
    f32x16 vv[C];
    for (int64_t c = 0; c < C; ++c) vv[c] = load16(v + j * v_stride + 16 * c);
    for (int r = 0; r < R; ++r) {
      const float pj = p[r * p_stride + j];
      for (int64_t c = 0; c < C; ++c) a[r][c] += pj * vv[c];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c) store16(acc + r * D + 16 * c, a[r][c]);
}

}  // namespace keyserve
