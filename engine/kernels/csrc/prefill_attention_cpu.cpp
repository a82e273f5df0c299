// Causal attention of a prompt chunk on the CPU: flash attention in float32
// arithmetic, over float32 or bfloat16 q, k, v and out.
//
// torch's CPU flash kernel reaches about 36 GFLOP/s on a 512-token SmolLM2
// prompt (9 query heads over 3 KV heads, head size 64): a fifth of the
// prompt pass. Here the work is tiled the way a GEMM is: a tile of queries
// (all G query heads of one KV head, so GQA shares every K and V load)
// against 64 keys at a time, with K transposed once per tile so that the
// scores of 64 keys are 4 vector FMAs per query dimension, and P @ V read
// row by row from the cache layout. A running ("online") softmax keeps only
// the tile's output and row statistics, so memory does not grow with the
// prompt. Causal tiles above the diagonal are skipped; the diagonal one is
// masked. In bfloat16 the tiles are prompt_paths.h's choice (AVX-512-BF16
// dot products where the build has them); logits, softmax and accumulators
// stay float32 and only the output is rounded.
//
// Op: keyserve::prefill_attention(out [n, Hq, D], q [n, Hq, D], k [S, Hkv, D],
//     v [S, Hkv, D], scale): query i sees keys [0, S - n + i] (a chunk after
//     S - n cached keys). All four float32, or all bfloat16. Rows of q, k, v
//     may have a stride (views of a merged projection); each row's heads
//     must be contiguous. D: 64 or 128.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "bf16.h"
#include "prompt_paths.h"
#include "vector_math.h"

namespace {

using keyserve::exp16_nonpositive;
using keyserve::exp_nonpositive;
using keyserve::f32x16;
using keyserve::load16;
using keyserve::bf16;
using keyserve::elements;
using keyserve::store16;
using keyserve::prompt::kKeys;
using keyserve::prompt::Path;
using keyserve::prompt::kKeyVecs;
using keyserve::prompt::kQueries;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

template <typename T>
struct Views {
  using P = Path<T>;
  const T* q;
  const typename P::Key* kt;  // K packed in tiles, [Hkv][tiles][words][64], zero-padded
  const typename P::Value* v;
  T* out;
  int64_t q_stride, v_stride, v_head_stride, out_stride;  // elements between rows, heads
  int64_t key_tiles;                                      // per KV head in kt
  int64_t n, S, G, offset;                                // offset = S - n
  float scale;
};

// Per-thread tile buffers.
template <int64_t D, typename T>
struct Tile {
  std::vector<typename Path<T>::Query> q;
  std::vector<float> p, acc, max, sum, rescale;
  std::vector<bf16> p16;  // P rounded for the bf16 dot products
  explicit Tile(int64_t rows)
      : q(rows * D),
        p(rows * kKeys),
        acc(rows * D),
        max(rows),
        sum(rows),
        rescale(rows),
        p16(rows * kKeys) {}
};

// Scores of one key tile -> probabilities in place, with the running max and
// sum of each row updated and rescale[m] the factor its earlier terms shrink
// by. Row m = g * nq + r is query i0 + r; key j0 + j is visible to it when
// j < count and j0 + j <= offset + i0 + r.
void softmax_tile(float* scores, int64_t rows, int64_t nq, int64_t i0, int64_t j0,
                  int64_t count, int64_t offset, float* max, float* sum, float* rescale) {
  for (int64_t m = 0; m < rows; ++m) {
    float* s = scores + m * kKeys;
    const int64_t visible = std::min(count, offset + i0 + m % nq - j0 + 1);
    for (int64_t j = std::max<int64_t>(visible, 0); j < kKeys; ++j) s[j] = kNegInf;
    f32x16 mx = load16(s);
    for (int64_t c = 1; c < kKeyVecs; ++c) {
      const f32x16 x = load16(s + 16 * c);
      mx = x > mx ? x : mx;
    }
    float tile_max = mx[0];
    for (int i = 1; i < 16; ++i) tile_max = std::max(tile_max, mx[i]);
    // Finite: every query sees key 0, which is in the first tile.
    const float new_max = std::max(max[m], tile_max);
    f32x16 total = {};
    for (int64_t c = 0; c < kKeyVecs; ++c) {
      const f32x16 e = exp16_nonpositive(load16(s + 16 * c) - new_max);
      store16(s + 16 * c, e);
      total += e;
    }
    rescale[m] = exp_nonpositive(max[m] - new_max);
    sum[m] = sum[m] * rescale[m] + keyserve::sum16(total);
    max[m] = new_max;
  }
}

// One tile: the queries [i0, i1) of every query head over KV head h.
template <int64_t D, typename T>
void attend_tile(const Views<T>& x, int64_t h, int64_t i0, int64_t i1, Tile<D, T>& t) {
  using P = Path<T>;
  const int64_t nq = i1 - i0, rows = x.G * nq;
  P::template load_queries<D>(x.q, x.q_stride, h, x.G, i0, nq, x.scale, t.q.data());
  std::fill(t.acc.begin(), t.acc.begin() + rows * D, 0.f);
  std::fill(t.max.begin(), t.max.begin() + rows, kNegInf);
  std::fill(t.sum.begin(), t.sum.begin() + rows, 0.f);
  const int64_t last_key = x.offset + i1 - 1;  // the tile's last query sees up to here
  for (int64_t j0 = 0; j0 <= last_key; j0 += kKeys) {
    const int64_t count = std::min(kKeys, std::min(x.S, last_key + 1) - j0);
    const auto* kt = x.kt + (h * x.key_tiles + j0 / kKeys) * D * kKeys;
    P::template score_tile<D>(t.q.data(), kt, t.p.data(), kKeys, rows, x.scale);
    softmax_tile(t.p.data(), rows, nq, i0, j0, count, x.offset, t.max.data(), t.sum.data(),
                 t.rescale.data());
    P::template accumulate_tile<D>(t.p.data(), kKeys, t.rescale.data(),
                                   x.v + j0 * x.v_stride + h * x.v_head_stride, x.v_stride,
                                   count, t.acc.data(), rows, t.p16.data());
  }
  for (int64_t g = 0; g < x.G; ++g)
    for (int64_t r = 0; r < nq; ++r) {
      const int64_t m = g * nq + r;
      T* o = x.out + (i0 + r) * x.out_stride + (h * x.G + g) * D;
      keyserve::prompt::store_output<D>(t.acc.data() + m * D, 1.f / t.sum[m], o);
    }
}

template <int64_t D, typename T>
void run(const Views<T>& x, int64_t num_kv_heads) {
  const int64_t tiles = (x.n + kQueries - 1) / kQueries;
  // A work item is a pair of query tiles from both ends (cheap early rows
  // with costly late ones), so static splitting balances the causal work.
  const int64_t pairs = (tiles + 1) / 2;
  at::parallel_for(0, num_kv_heads * pairs, 1, [&](int64_t begin, int64_t end) {
    Tile<D, T> t(x.G * kQueries);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t h = item / pairs, first = item % pairs, second = tiles - 1 - first;
      attend_tile<D>(x, h, first * kQueries, std::min(x.n, (first + 1) * kQueries), t);
      if (second != first) {  // an odd count's middle tile runs once
        attend_tile<D>(x, h, second * kQueries, std::min(x.n, (second + 1) * kQueries), t);
      }
    }
  });
}

template <typename T>
void attend(at::Tensor& out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
            float scale) {
  const int64_t n = q.size(0), Hq = q.size(1), D = q.size(2), S = k.size(0), Hkv = k.size(1);
  const auto packed = Path<T>::pack(k, v, D);
  const Views<T> x{elements<T>(q), packed.kt, packed.v, elements<T>(out), q.stride(0),
                   packed.v_stride, packed.v_head_stride, out.stride(0), packed.key_tiles,
                   n, S, Hq / Hkv, S - n, scale};
  if (D == 64) {
    run<64>(x, Hkv);
  } else {
    run<128>(x, Hkv);
  }
}

void prefill_attention(at::Tensor out, const at::Tensor& q, const at::Tensor& k,
                       const at::Tensor& v, double scale) {
  keyserve::prompt::check_prompt_shapes(out, q, k, v);
  if (q.size(0) == 0) return;
  if (q.scalar_type() == at::kBFloat16) {
    attend<bf16>(out, q, k, v, static_cast<float>(scale));
  } else {
    attend<float>(out, q, k, v, static_cast<float>(scale));
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(keyserve, m) {
  m.def("prefill_attention(Tensor(a!) out, Tensor q, Tensor k, Tensor v, float scale) -> ()");
}

TORCH_LIBRARY_IMPL(keyserve, CPU, m) { m.impl("prefill_attention", &prefill_attention); }
