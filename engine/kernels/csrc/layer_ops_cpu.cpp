// The small per-token ops of a decoder layer, each one pass over its rows.
//
// In torch, RMSNorm is six ops (float, pow, mean, add, rsqrt, two muls), RoPE
// on q and k about fifteen (gathers, chunks, muls, cats) and SwiGLU three,
// each a full pass over memory and, at decode batch sizes, a dispatch that
// costs more than its arithmetic. Fused, they are one pass each.
//
// Rows are float32 or bfloat16 (all of an op's rows and weights one dtype;
// the RoPE tables float32). bfloat16 rows are widened on load, computed in
// float32 and rounded on store. Where transformers' bfloat16 modules round
// an intermediate to bfloat16 (RMSNorm's normalised row before the weight,
// SiLU's output before the product, each RoPE product before their sum, the
// RoPE tables themselves), these kernels round the same one, so a bfloat16
// model follows transformers' numerics up to summation order; in float32
// nothing is rounded in between. The Python side falls back to the torch
// ops for any other dtype.
//
// Ops (all in place, rows [T, ...] with a row stride, so views of a merged
// projection's output can be passed as they are):
//   rms_norm(out [T, H], x [T, H], weight [H], eps)
//       out = weight * x / sqrt(mean(x^2) + eps)
//   add_rms_norm(x [T, H], residual [T, H], weight [H], eps)
//       residual += x; x = rms_norm(residual)   (the pre-norm block's residual step)
//   silu_and_mul(out [T, I], gate_up [T, 2I])
//       out = silu(gate_up[:, :I]) * gate_up[:, I:]
//   rotary_(q [T, Hq, D], k [T, Hk, D], positions [T] int64, cos [P, R/2], sin [P, R/2])
//       rotates the first R dims of every head by halves (Llama's RoPE), in place.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "bf16.h"
#include "vector_math.h"

namespace {

using keyserve::bf16;
using keyserve::exp16_nonpositive;
using keyserve::exp_nonpositive;
using keyserve::f32x16;
using keyserve::load16;
using keyserve::store16;
using keyserve::sum16;
using keyserve::to_f32;

// Rows per work item: each is a few hundred floats, too small to split.
constexpr int64_t kRowGrain = 16;

// A value rounded to T's precision (kept in float32): the identity for float.
template <typename T, typename V>
inline V rounded(V v) {
  if constexpr (std::is_same_v<T, bf16>) {
    return keyserve::round_bf16(v);
  } else {
    return v;
  }
}

// A float32 result stored as T (rounded to nearest even for bf16).
template <typename T>
inline T narrow(float v) {
  if constexpr (std::is_same_v<T, bf16>) {
    return keyserve::to_bf16(v);
  } else {
    return v;
  }
}

template <typename T>
T* rows_of(const at::Tensor& t) {
  if constexpr (std::is_same_v<T, bf16>) {
    return reinterpret_cast<bf16*>(t.data_ptr<at::BFloat16>());
  } else {
    return t.data_ptr<float>();
  }
}

// Runs f(T{}) with T the storage type of `t`'s dtype (checked before).
template <typename F>
void by_dtype(const at::Tensor& t, F&& f) {
  if (t.scalar_type() == at::kBFloat16) {
    f(bf16{});
  } else {
    f(float{});
  }
}

void check_rows(const at::Tensor& t, int64_t dims, const char* name) {
  TORCH_CHECK(t.device().is_cpu() &&
                  (t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16),
              name, ": float32 or bfloat16 CPU only");
  TORCH_CHECK(t.dim() == dims, name, ": expected ", dims, " dims, got ", t.dim());
  TORCH_CHECK(t.stride(-1) == 1, name, ": the last dim must be contiguous");
  if (dims == 3) TORCH_CHECK(t.stride(1) == t.size(2), name, ": heads must be contiguous");
}

void check_same_dtype(const at::Tensor& a, const at::Tensor& b, const char* what) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), what, ": one dtype, got ", a.scalar_type(),
              " and ", b.scalar_type());
}

// 1 / sqrt(mean(x^2) + eps) of one row.
template <typename T>
float inverse_rms(const T* x, int64_t n, float eps) {
  f32x16 acc = {};
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const f32x16 v = load16(x + j);
    acc += v * v;
  }
  float sum = sum16(acc);
  for (; j < n; ++j) sum += to_f32(x[j]) * to_f32(x[j]);
  return 1.f / std::sqrt(sum / static_cast<float>(n) + eps);
}

// out[j] = w[j] * (x[j] * inv), the reference's order of rounding.
template <typename T>
void scale_row(const T* x, const T* w, float inv, int64_t n, T* out) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    store16(out + j, load16(w + j) * rounded<T>(load16(x + j) * inv));
  }
  for (; j < n; ++j) out[j] = narrow<T>(to_f32(w[j]) * rounded<T>(to_f32(x[j]) * inv));
}

// Both norms' arguments: rows x and `other` (out or residual) of one shape,
// and a weight per column, all of one dtype.
void check_norm(const at::Tensor& x, const at::Tensor& other, const at::Tensor& weight,
                const char* other_name) {
  check_rows(x, 2, "x");
  check_rows(other, 2, other_name);
  TORCH_CHECK(other.sizes() == x.sizes(), "x and ", other_name, " differ in shape");
  check_same_dtype(x, other, other_name);
  check_same_dtype(x, weight, "weight");
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == x.size(1), "weight: contiguous [H]");
}

template <typename T>
void rms_norm_rows(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, float eps) {
  const int64_t H = x.size(1), xs = x.stride(0), os = out.stride(0);
  const T* xp = rows_of<T>(x);
  const T* wp = rows_of<T>(weight);
  T* op = rows_of<T>(out);
  at::parallel_for(0, x.size(0), kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* row = xp + t * xs;
      scale_row(row, wp, inverse_rms(row, H, eps), H, op + t * os);
    }
  });
}

void rms_norm(at::Tensor out, const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_norm(x, out, weight, "out");
  by_dtype(x, [&](auto tag) {
    rms_norm_rows<decltype(tag)>(out, x, weight, static_cast<float>(eps));
  });
}

// res[j] += x[j], rounded to T.
template <typename T>
void add_row(T* res, const T* x, int64_t n) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) store16(res + j, load16(res + j) + load16(x + j));
  for (; j < n; ++j) res[j] = narrow<T>(to_f32(res[j]) + to_f32(x[j]));
}

template <typename T>
void add_rms_norm_rows(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, float eps) {
  const int64_t H = x.size(1), xs = x.stride(0), rs = residual.stride(0);
  T* xp = rows_of<T>(x);
  T* rp = rows_of<T>(residual);
  const T* wp = rows_of<T>(weight);
  at::parallel_for(0, x.size(0), kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      T* row = xp + t * xs;
      T* res = rp + t * rs;
      add_row(res, row, H);
      scale_row(res, wp, inverse_rms(res, H, eps), H, row);
    }
  });
}

void add_rms_norm(at::Tensor x, at::Tensor residual, const at::Tensor& weight, double eps) {
  check_norm(x, residual, weight, "residual");
  by_dtype(x, [&](auto tag) {
    add_rms_norm_rows<decltype(tag)>(x, residual, weight, static_cast<float>(eps));
  });
}

// silu(g) = g / (1 + e^-g), written with e = e^-|g| so that nothing
// overflows: g / (1 + e) for g >= 0, g e / (1 + e) below.
inline f32x16 silu16(f32x16 g) {
  const f32x16 zero = {};
  const f32x16 e = exp16_nonpositive(zero - keyserve::abs16(g));
  const f32x16 numerator = g < zero ? g * e : g;
  return numerator / (e + 1.f);
}

inline float silu(float g) {
  const float e = exp_nonpositive(-std::fabs(g));
  return (g < 0.f ? g * e : g) / (1.f + e);
}

template <typename T>
void silu_and_mul_rows(at::Tensor& out, const at::Tensor& gate_up) {
  const int64_t I = out.size(1), gs = gate_up.stride(0), os = out.stride(0);
  const T* gp = rows_of<T>(gate_up);
  T* op = rows_of<T>(out);
  at::parallel_for(0, out.size(0), kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* gate = gp + t * gs;
      const T* up = gate + I;
      T* o = op + t * os;
      int64_t j = 0;
      for (; j + 16 <= I; j += 16) {
        store16(o + j, rounded<T>(silu16(load16(gate + j))) * load16(up + j));
      }
      for (; j < I; ++j) o[j] = narrow<T>(rounded<T>(silu(to_f32(gate[j]))) * to_f32(up[j]));
    }
  });
}

void silu_and_mul(at::Tensor out, const at::Tensor& gate_up) {
  check_rows(out, 2, "out");
  check_rows(gate_up, 2, "gate_up");
  check_same_dtype(out, gate_up, "out and gate_up");
  TORCH_CHECK(gate_up.size(0) == out.size(0) && gate_up.size(1) == 2 * out.size(1),
              "gate_up must be [T, 2 * I] for out [T, I]");
  by_dtype(out, [&](auto tag) { silu_and_mul_rows<decltype(tag)>(out, gate_up); });
}

// x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin over the halves of the first
// 2 * half dims of one head (in bfloat16, as transformers: the tables and
// each product rounded before the sum).
template <typename T>
void rotate_head(T* x, const float* cos, const float* sin, int64_t half) {
  T* x2 = x + half;
  int64_t j = 0;
  for (; j + 16 <= half; j += 16) {
    const f32x16 a = load16(x + j), b = load16(x2 + j);
    const f32x16 c = rounded<T>(load16(cos + j)), s = rounded<T>(load16(sin + j));
    store16(x + j, rounded<T>(a * c) - rounded<T>(b * s));
    store16(x2 + j, rounded<T>(b * c) + rounded<T>(a * s));
  }
  for (; j < half; ++j) {
    const float a = to_f32(x[j]), b = to_f32(x2[j]);
    const float c = rounded<T>(cos[j]), s = rounded<T>(sin[j]);
    x[j] = narrow<T>(rounded<T>(a * c) - rounded<T>(b * s));
    x2[j] = narrow<T>(rounded<T>(b * c) + rounded<T>(a * s));
  }
}

template <typename T>
void rotary_rows(at::Tensor& q, at::Tensor& k, const int64_t* pos, const at::Tensor& cos,
                 const at::Tensor& sin) {
  const int64_t half = cos.size(1), Hq = q.size(1), Hk = k.size(1), D = q.size(2);
  const int64_t qs = q.stride(0), ks = k.stride(0);
  T* qp = rows_of<T>(q);
  T* kp = rows_of<T>(k);
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  at::parallel_for(0, q.size(0), kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cp + pos[t] * half;
      const float* s = sp + pos[t] * half;
      for (int64_t h = 0; h < Hq; ++h) rotate_head(qp + t * qs + h * D, c, s, half);
      for (int64_t h = 0; h < Hk; ++h) rotate_head(kp + t * ks + h * D, c, s, half);
    }
  });
}

void rotary_(at::Tensor q, at::Tensor k, const at::Tensor& positions, const at::Tensor& cos,
             const at::Tensor& sin) {
  check_rows(q, 3, "q");
  check_rows(k, 3, "k");
  check_same_dtype(q, k, "q and k");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(2) == q.size(2), "q and k differ in tokens or dims");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous() &&
                  positions.numel() == q.size(0),
              "positions: contiguous int64 [T]");
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.dim() == 2 && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.scalar_type() == at::kFloat &&
                  sin.scalar_type() == at::kFloat,
              "cos, sin: contiguous float32 [P, R/2]");
  TORCH_CHECK(2 * cos.size(1) <= q.size(2), "rotary dims exceed the head size");
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t t = 0; t < q.size(0); ++t) {
    TORCH_CHECK(pos[t] >= 0 && pos[t] < cos.size(0), "position ", pos[t],
                " outside the rotary table");
  }
  by_dtype(q, [&](auto tag) { rotary_rows<decltype(tag)>(q, k, pos, cos, sin); });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(keyserve, m) {
  m.def("rms_norm(Tensor(a!) out, Tensor x, Tensor weight, float eps) -> ()");
  m.def("add_rms_norm(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps) -> ()");
  m.def("silu_and_mul(Tensor(a!) out, Tensor gate_up) -> ()");
  m.def(
      "rotary_(Tensor(a!) q, Tensor(b!) k, Tensor positions, Tensor cos, Tensor sin) -> ()");
}

TORCH_LIBRARY_IMPL(keyserve, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("rotary_", &rotary_);
}
