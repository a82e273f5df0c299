// bfloat16 linear layers, y = x W^T (+ b), through AVX-512-BF16's VDPBF16PS.
//
// oneDNN's brg_matmul on this project's AVX-512-BF16 CPUs (no AMX) reads a
// decode step's weights well below the memory's speed: over SmolLM2-135M's
// linears it took 12.9 ms at M = 1 (21 GB/s of weights) and 18 ms at M = 16,
// where this kernel takes 6.6 and 14.4 (1.96x, 1.25x; 1.14x at M = 64), and
// it is 1-2% behind at prompt sizes (M = 512-2048, about 400 GFLOP/s both;
// bench/results/bf16_linear/). Decode steps are most of a served run's time,
// and linears most of a decode step.
//
// The weight is packed once, at load, into panels of 32 output columns with
// k in pairs: panel p holds, for each pair j, the 32 words (W[n][2j],
// W[n][2j+1]) of n = 32p..32p+31, which is VDPBF16PS's operand layout. A
// panel streams from memory once and stays in cache while every group of 8
// rows of x multiplies it; each product accumulates in float32 (16
// accumulators, two per row) and is rounded to bfloat16 once, with the bias
// added first, as torch does. Threads split the panels.
//
// Ops: keyserve::pack_linear_bf16(weight [N, K] bf16) -> packed
//      keyserve::linear_bf16(x [M, K] bf16, packed, int N, Tensor? bias float) -> [M, N] bf16
// Built without AVX-512-BF16, both ops raise, and the caller keeps oneDNN.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kCols = 32;  // output columns per panel: two zmm of float32
constexpr int kMaxRows = 8;    // rows of x per tile: 16 accumulators

void check_weight(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16, "weight: [N, K] bfloat16");
}

#if defined(__AVX512BF16__)

// One k pair of W (32 columns) times one pair of x per row (pair_of(r)),
// into the rows' float32 accumulators.
template <int Rows, typename PairOf>
inline void multiply_pair(const uint32_t* words, PairOf pair_of, __m512* lo, __m512* hi) {
  const __m512bh w_lo = (__m512bh)_mm512_loadu_si512(words);
  const __m512bh w_hi = (__m512bh)_mm512_loadu_si512(words + 16);
#pragma GCC unroll 8
  for (int r = 0; r < Rows; ++r) {
    const __m512bh a = (__m512bh)_mm512_set1_epi32(pair_of(r));
    lo[r] = _mm512_dpbf16_ps(lo[r], a, w_lo);
    hi[r] = _mm512_dpbf16_ps(hi[r], a, w_hi);
  }
}

// y[r, 0:cols] for `Rows` rows of x against one panel.
template <int Rows>
void tile(const uint16_t* x, int64_t x_stride, int64_t K, const uint32_t* panel,
          const float* bias, uint16_t* y, int64_t y_stride, int64_t cols) {
  __m512 lo[Rows], hi[Rows];
  for (int r = 0; r < Rows; ++r) lo[r] = hi[r] = _mm512_setzero_ps();
  for (int64_t j = 0; j < K / 2; ++j) {
    const auto pair_of = [&](int r) {
      int32_t pair;
      std::memcpy(&pair, x + r * x_stride + 2 * j, 4);
      return pair;
    };
    multiply_pair<Rows>(panel + j * kCols, pair_of, lo, hi);
  }
  if (K % 2 == 1) {  // the last k alone: its pair's second half is zero in x and W
    const auto last = [&](int r) { return static_cast<int32_t>(x[r * x_stride + K - 1]); };
    multiply_pair<Rows>(panel + (K / 2) * kCols, last, lo, hi);
  }
  alignas(64) float b[kCols] = {};
  if (bias != nullptr) std::copy(bias, bias + cols, b);
  const __m512 b_lo = _mm512_load_ps(b), b_hi = _mm512_load_ps(b + 16);
  for (int r = 0; r < Rows; ++r) {
    alignas(64) uint16_t out[kCols];
    _mm256_store_si256(reinterpret_cast<__m256i*>(out),
                       (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(lo[r], b_lo)));
    _mm256_store_si256(reinterpret_cast<__m256i*>(out + 16),
                       (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(hi[r], b_hi)));
    std::memcpy(y + r * y_stride, out, cols * sizeof(uint16_t));
  }
}

using TileFn = void (*)(const uint16_t*, int64_t, int64_t, const uint32_t*, const float*,
                        uint16_t*, int64_t, int64_t);
constexpr TileFn kTiles[kMaxRows + 1] = {nullptr,  tile<1>, tile<2>, tile<3>, tile<4>,
                                         tile<5>, tile<6>, tile<7>, tile<8>};

at::Tensor pack_linear_bf16(const at::Tensor& weight) {
  check_weight(weight);
  const int64_t N = weight.size(0), K = weight.size(1);
  const int64_t panels = (N + kCols - 1) / kCols, pairs = (K + 1) / 2;
  at::Tensor packed = at::zeros({panels, pairs, kCols}, weight.options().dtype(at::kInt));
  const at::Tensor w = weight.contiguous();
  const auto* src = reinterpret_cast<const uint16_t*>(w.data_ptr());
  auto* dst = reinterpret_cast<uint32_t*>(packed.data_ptr());
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p)
      for (int64_t j = 0; j < pairs; ++j)
        for (int64_t c = 0; c < kCols && p * kCols + c < N; ++c) {
          const uint16_t* row = src + (p * kCols + c) * K;
          const uint32_t first = row[2 * j], second = 2 * j + 1 < K ? row[2 * j + 1] : 0;
          dst[(p * pairs + j) * kCols + c] = first | (second << 16);
        }
  });
  return packed;
}

at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& packed, int64_t N,
                       const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.stride(1) == 1,
              "x: [M, K] bfloat16 with unit column stride");
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kInt && packed.size(2) == kCols &&
                  packed.is_contiguous(),
              "packed: pack_linear_bf16's output");
  const int64_t M = x.size(0), K = x.size(1), panels = packed.size(0);
  TORCH_CHECK(packed.size(1) == (K + 1) / 2 && (N + kCols - 1) / kCols == panels,
              "packed weight is for another shape");
  const float* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N,
                "bias: [N] float32");
    b = bias->data_ptr<float>();
  }
  at::Tensor y = at::empty({M, N}, x.options());
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const auto* wp = reinterpret_cast<const uint32_t*>(packed.data_ptr());
  auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr());
  const int64_t panel_words = packed.size(1) * kCols;
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t n0 = p * kCols, cols = std::min(kCols, N - n0);
      for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kMaxRows, M - m0));
        kTiles[rows](xp + m0 * x.stride(0), x.stride(0), K, wp + p * panel_words,
                     b == nullptr ? nullptr : b + n0, yp + m0 * N + n0, N, cols);
      }
    }
  });
  return y;
}

#else  // no AVX-512-BF16 in this build

at::Tensor pack_linear_bf16(const at::Tensor& weight) {
  check_weight(weight);
  TORCH_CHECK(false, "linear_bf16: these kernels were built without AVX-512-BF16");
}

at::Tensor linear_bf16(const at::Tensor&, const at::Tensor&, int64_t,
                       const std::optional<at::Tensor>&) {
  TORCH_CHECK(false, "linear_bf16: these kernels were built without AVX-512-BF16");
}

#endif  // __AVX512BF16__

}  // namespace

TORCH_LIBRARY_FRAGMENT(keyserve, m) {
  m.def("pack_linear_bf16(Tensor weight) -> Tensor");
  m.def("linear_bf16(Tensor x, Tensor packed, int n, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(keyserve, CPU, m) {
  m.impl("pack_linear_bf16", &pack_linear_bf16);
  m.impl("linear_bf16", &linear_bf16);
}
