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

// exp(x) for the softmax's x <= 0, in plain arithmetic so that `omp simd`
// vectorizes it (glibc's vector exp needs -ffast-math, which would also break
// the -inf handling elsewhere): 2^t = 2^k * 2^f with k = round(t), |f| <= 1/2,
// and 2^f by its Taylor series to the 6th power (relative error below 2e-8,
// under float32's rounding). Below -87, where exp(x) leaves float32's normal
// range, the result is 0: the clamp keeps 2^k's exponent field valid (k >=
// -126), and a flush rather than a denormal keeps the arithmetic fast.
#pragma omp declare simd notinbranch
inline float exp_nonpositive(float x) {
  const float t = std::max(x * 1.44269504088896341f, -126.f);  // log2(e)
  const float k = std::floor(t + 0.5f);
  const float f = (t - k) * 0.693147180559945309f;  // ln 2
  float p = 1.f / 720.f;
  p = p * f + 1.f / 120.f;
  p = p * f + 1.f / 24.f;
  p = p * f + 1.f / 6.f;
  p = p * f + 0.5f;
  p = p * f + 1.f;
  p = p * f + 1.f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;  // 2^k, k >= -126
  const float r = p * __builtin_bit_cast(float, bits);
  return x < -87.f ? 0.f : r;
}

}  // namespace keyserve
