// Causal attention of a prompt chunk on the CPU: flash attention in float32.
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
// masked.
//
// Op: keyserve::prefill_attention(out [n, Hq, D], q [n, Hq, D], k [S, Hkv, D],
//     v [S, Hkv, D], scale): query i sees keys [0, S - n + i] (a chunk after
//     S - n cached keys). Rows of q, k, v may have a stride (views of a merged
//     projection); each row's heads must be contiguous. D: 64 or 128.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "vector_math.h"

namespace {

using keyserve::exp16_nonpositive;
using keyserve::accumulate_values;
using keyserve::exp_nonpositive;
using keyserve::f32x16;
using keyserve::load16;
using keyserve::store16;

constexpr int64_t kKeys = 64;      // keys per tile: 4 vectors of scores per query row
constexpr int64_t kQueries = 16;   // query positions per tile (times G heads)
constexpr int64_t kKeyVecs = kKeys / 16;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Views {
  const float *q, *kt, *v;  // kt: K transposed by tiles, [Hkv][tiles][D][64], zero-padded
  float* out;
  int64_t q_stride, v_stride, out_stride;  // floats between token rows
  int64_t key_tiles;                        // per KV head in kt
  int64_t n, S, G, offset;                           // offset = S - n
  float scale;
};

// Per-thread tile buffers.
template <int64_t D>
struct Tile {
  std::vector<float> q, p, acc, max, sum, rescale;
  explicit Tile(int64_t rows)
      : q(rows * D),
        p(rows * kKeys),
        acc(rows * D),
        max(rows),
        sum(rows),
        rescale(rows) {}
};

// scores[m][0, 64) = q[m] . kt[:, 0, 64) for R query rows (kt: [D][stride]):
// 4 x R accumulators, one broadcast per row and dimension, K loaded once for
// all R rows.
template <int64_t D, int R>
inline void score_rows(const float* q, const float* kt, int64_t stride, float* scores) {
  f32x16 acc[R][kKeyVecs] = {};
  for (int64_t d = 0; d < D; ++d) {
    f32x16 kv[kKeyVecs];
    for (int64_t c = 0; c < kKeyVecs; ++c) kv[c] = load16(kt + d * stride + 16 * c);
    for (int r = 0; r < R; ++r) {
      const float qd = q[r * D + d];
      for (int64_t c = 0; c < kKeyVecs; ++c) acc[r][c] += qd * kv[c];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int64_t c = 0; c < kKeyVecs; ++c) store16(scores + r * kKeys + 16 * c, acc[r][c]);
}

// Rows per register block: R x (accumulator vectors) within 16 registers.
template <int64_t D>
constexpr int kValueRows = D == 64 ? 4 : 2;

// The tile's rows in register blocks of R, then one at a time for the tail.
template <int64_t D>
void score_tile(const float* q, const float* kt, int64_t stride, float* scores, int64_t rows) {
  int64_t m = 0;
  for (; m + 4 <= rows; m += 4) score_rows<D, 4>(q + m * D, kt, stride, scores + m * kKeys);
  for (; m < rows; ++m) score_rows<D, 1>(q + m * D, kt, stride, scores + m * kKeys);
}

template <int64_t D>
void accumulate_tile(const float* p, const float* rescale, const float* v, int64_t v_stride,
                     int64_t count, float* acc, int64_t rows) {
  constexpr int R = kValueRows<D>;
  int64_t m = 0;
  for (; m + R <= rows; m += R)
    accumulate_values<D, R>(p + m * kKeys, kKeys, rescale + m, v, v_stride, count, acc + m * D);
  for (; m < rows; ++m)
    accumulate_values<D, 1>(p + m * kKeys, kKeys, rescale + m, v, v_stride, count, acc + m * D);
}

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
template <int64_t D>
void attend_tile(const Views& x, int64_t h, int64_t i0, int64_t i1, Tile<D>& t) {
  const int64_t nq = i1 - i0, rows = x.G * nq;
  for (int64_t g = 0; g < x.G; ++g)
    for (int64_t r = 0; r < nq; ++r) {
      const float* src = x.q + (i0 + r) * x.q_stride + (h * x.G + g) * D;
      float* dst = t.q.data() + (g * nq + r) * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = src[d] * x.scale;
    }
  std::fill(t.acc.begin(), t.acc.begin() + rows * D, 0.f);
  std::fill(t.max.begin(), t.max.begin() + rows, kNegInf);
  std::fill(t.sum.begin(), t.sum.begin() + rows, 0.f);
  const int64_t last_key = x.offset + i1 - 1;  // the tile's last query sees up to here
  for (int64_t j0 = 0; j0 <= last_key; j0 += kKeys) {
    const int64_t count = std::min(kKeys, std::min(x.S, last_key + 1) - j0);
    const float* kt = x.kt + (h * x.key_tiles + j0 / kKeys) * D * kKeys;
    score_tile<D>(t.q.data(), kt, kKeys, t.p.data(), rows);
    softmax_tile(t.p.data(), rows, nq, i0, j0, count, x.offset, t.max.data(), t.sum.data(),
                 t.rescale.data());
    accumulate_tile<D>(t.p.data(), t.rescale.data(), x.v + j0 * x.v_stride + h * D, x.v_stride,
                       count, t.acc.data(), rows);
  }
  for (int64_t g = 0; g < x.G; ++g)
    for (int64_t r = 0; r < nq; ++r) {
      const int64_t m = g * nq + r;
      const float inv = 1.f / t.sum[m];
      const float* a = t.acc.data() + m * D;
      float* o = x.out + (i0 + r) * x.out_stride + (h * x.G + g) * D;
      for (int64_t d = 0; d < D; ++d) o[d] = a[d] * inv;
    }
}

template <int64_t D>
void run(const Views& x, int64_t num_kv_heads) {
  const int64_t tiles = (x.n + kQueries - 1) / kQueries;
  // A work item is a pair of query tiles from both ends (cheap early rows
  // with costly late ones), so static splitting balances the causal work.
  const int64_t pairs = (tiles + 1) / 2;
  at::parallel_for(0, num_kv_heads * pairs, 1, [&](int64_t begin, int64_t end) {
    Tile<D> t(x.G * kQueries);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t h = item / pairs, first = item % pairs, second = tiles - 1 - first;
      attend_tile<D>(x, h, first * kQueries, std::min(x.n, (first + 1) * kQueries), t);
      if (second != first) {  // an odd count's middle tile runs once
        attend_tile<D>(x, h, second * kQueries, std::min(x.n, (second + 1) * kQueries), t);
      }
    }
  });
}

// K [S, Hkv, D] (rows with a stride) -> [Hkv][tiles][D][64], zeros past S:
// a score tile reads 64 keys of one dimension as 4 vectors, and its 16 KB
// are contiguous (a [D][S] layout puts the D rows a power of two apart,
// into the same few L1 sets).
at::Tensor transpose_keys(const at::Tensor& k, int64_t D) {
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

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 3, name,
              ": float32 CPU [tokens, heads, D]");
  TORCH_CHECK(t.stride(2) == 1 && t.stride(1) == t.size(2), name,
              ": each row's heads must be contiguous");
}

void prefill_attention(at::Tensor out, const at::Tensor& q, const at::Tensor& k,
                       const at::Tensor& v, double scale) {
  check_rows(out, "out");
  check_rows(q, "q");
  check_rows(k, "k");
  check_rows(v, "v");
  const int64_t n = q.size(0), Hq = q.size(1), D = q.size(2), S = k.size(0), Hkv = k.size(1);
  TORCH_CHECK(out.sizes() == q.sizes(), "out must be shaped like q");
  TORCH_CHECK(v.sizes() == k.sizes() && k.size(2) == D, "k and v: [S, Hkv, D] like q's D");
  TORCH_CHECK(Hq % Hkv == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(S >= n, "fewer keys than queries");
  TORCH_CHECK(D == 64 || D == 128, "head size 64 or 128 only");
  if (n == 0) return;
  const at::Tensor kt = transpose_keys(k, D);
  const Views x{q.data_ptr<float>(), kt.data_ptr<float>(), v.data_ptr<float>(),
                out.data_ptr<float>(), q.stride(0), v.stride(0), out.stride(0), kt.size(1),
                n, S, Hq / Hkv, S - n, static_cast<float>(scale)};
  if (D == 64) {
    run<64>(x, Hkv);
  } else {
    run<128>(x, Hkv);
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(keyserve, m) {
  m.def("prefill_attention(Tensor(a!) out, Tensor q, Tensor k, Tensor v, float scale) -> ()");
}

TORCH_LIBRARY_IMPL(keyserve, CPU, m) { m.impl("prefill_attention", &prefill_attention); }
