// The small per-token ops of a decoder layer, each one pass over its rows.
//
// In torch, RMSNorm is six ops (float, pow, mean, add, rsqrt, two muls), RoPE
// on q and k about fifteen (gathers, chunks, muls, cats) and SwiGLU three,
// each a full pass over memory and, at decode batch sizes, a dispatch that
// costs more than its arithmetic. Fused, they are one pass each.
// float32 only; the Python side falls back to the torch ops for anything else.
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

#include "vector_math.h"

namespace {

using keyserve::exp16_nonpositive;
using keyserve::exp_nonpositive;
using keyserve::f32x16;
using keyserve::load16;
using keyserve::store16;
using keyserve::sum16;

// Rows per work item: each is a few hundred floats, too small to split.
constexpr int64_t kRowGrain = 16;

void check_rows(const at::Tensor& t, int64_t dims, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name, ": float32 CPU only");
  TORCH_CHECK(t.dim() == dims, name, ": expected ", dims, " dims, got ", t.dim());
  TORCH_CHECK(t.stride(-1) == 1, name, ": the last dim must be contiguous");
  if (dims == 3) TORCH_CHECK(t.stride(1) == t.size(2), name, ": heads must be contiguous");
}

// 1 / sqrt(mean(x^2) + eps) of one row.
float inverse_rms(const float* x, int64_t n, float eps) {
  f32x16 acc = {};
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const f32x16 v = load16(x + j);
    acc += v * v;
  }
  float sum = sum16(acc);
  for (; j < n; ++j) sum += x[j] * x[j];
  return 1.f / std::sqrt(sum / static_cast<float>(n) + eps);
}

// out[j] = w[j] * (x[j] * inv), the reference's order of rounding.
void scale_row(const float* x, const float* w, float inv, int64_t n, float* out) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) store16(out + j, load16(w + j) * (load16(x + j) * inv));
  for (; j < n; ++j) out[j] = w[j] * (x[j] * inv);
}

// Both norms' arguments: rows x and `other` (out or residual) of one shape,
// and a float32 weight per column.
void check_norm(const at::Tensor& x, const at::Tensor& other, const at::Tensor& weight,
                const char* other_name) {
  check_rows(x, 2, "x");
  check_rows(other, 2, other_name);
  TORCH_CHECK(other.sizes() == x.sizes(), "x and ", other_name, " differ in shape");
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == x.size(1) &&
                  weight.scalar_type() == at::kFloat,
              "weight: float32 [H]");
}

void rms_norm(at::Tensor out, const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_norm(x, out, weight, "out");
  const int64_t H = x.size(1), xs = x.stride(0), os = out.stride(0);
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, x.size(0), kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* row = xp + t * xs;
      scale_row(row, wp, inverse_rms(row, H, e), H, op + t * os);
    }
  });
}

void add_rms_norm(at::Tensor x, at::Tensor residual, const at::Tensor& weight, double eps) {
  check_norm(x, residual, weight, "residual");
  const int64_t H = x.size(1), xs = x.stride(0), rs = residual.stride(0);
  float* xp = x.data_ptr<float>();
  float* rp = residual.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, x.size(0), kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      float* row = xp + t * xs;
      float* res = rp + t * rs;
      for (int64_t j = 0; j < H; ++j) res[j] += row[j];
      scale_row(res, wp, inverse_rms(res, H, e), H, row);
    }
  });
}

// silu(g) = g / (1 + e^-g), written with e = e^-|g| so that nothing
// overflows: g / (1 + e) for g >= 0, g e / (1 + e) below.
inline f32x16 silu16(f32x16 g) {
  const f32x16 zero = {};
  const f32x16 magnitude = g < zero ? zero - g : g;
  const f32x16 e = exp16_nonpositive(zero - magnitude);
  const f32x16 numerator = g < zero ? g * e : g;
  return numerator / (e + 1.f);
}

void silu_and_mul(at::Tensor out, const at::Tensor& gate_up) {
  check_rows(out, 2, "out");
  check_rows(gate_up, 2, "gate_up");
  const int64_t I = out.size(1);
  TORCH_CHECK(gate_up.size(0) == out.size(0) && gate_up.size(1) == 2 * I,
              "gate_up must be [T, 2 * I] for out [T, I]");
  const int64_t gs = gate_up.stride(0), os = out.stride(0);
  const float* gp = gate_up.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, out.size(0), kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* gate = gp + t * gs;
      const float* up = gate + I;
      float* o = op + t * os;
      int64_t j = 0;
      for (; j + 16 <= I; j += 16) store16(o + j, silu16(load16(gate + j)) * load16(up + j));
      for (; j < I; ++j) {
        const float g = gate[j], e = exp_nonpositive(-std::fabs(g));
        o[j] = (g < 0.f ? g * e : g) / (1.f + e) * up[j];
      }
    }
  });
}

// x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin over the halves of the first
// 2 * half dims of one head.
void rotate_head(float* x, const float* cos, const float* sin, int64_t half) {
  float* x2 = x + half;
  int64_t j = 0;
  for (; j + 16 <= half; j += 16) {
    const f32x16 a = load16(x + j), b = load16(x2 + j);
    const f32x16 c = load16(cos + j), s = load16(sin + j);
    store16(x + j, a * c - b * s);
    store16(x2 + j, b * c + a * s);
  }
  for (; j < half; ++j) {
    const float a = x[j], b = x2[j];
    x[j] = a * cos[j] - b * sin[j];
    x2[j] = b * cos[j] + a * sin[j];
  }
}

void rotary_(at::Tensor q, at::Tensor k, const at::Tensor& positions, const at::Tensor& cos,
             const at::Tensor& sin) {
  check_rows(q, 3, "q");
  check_rows(k, 3, "k");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(2) == q.size(2), "q and k differ in tokens or dims");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous() &&
                  positions.numel() == q.size(0),
              "positions: contiguous int64 [T]");
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.dim() == 2 && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.scalar_type() == at::kFloat &&
                  sin.scalar_type() == at::kFloat,
              "cos, sin: contiguous float32 [P, R/2]");
  const int64_t half = cos.size(1), P = cos.size(0);
  TORCH_CHECK(2 * half <= q.size(2), "rotary dims exceed the head size");
  const int64_t Hq = q.size(1), Hk = k.size(1), D = q.size(2);
  const int64_t qs = q.stride(0), ks = k.stride(0);
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t t = 0; t < q.size(0); ++t) {
    TORCH_CHECK(pos[t] >= 0 && pos[t] < P, "position ", pos[t], " outside the rotary table");
  }
  float* qp = q.data_ptr<float>();
  float* kp = k.data_ptr<float>();
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
