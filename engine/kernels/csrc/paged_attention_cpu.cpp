// Decode attention on the CPU, reading K and V in place from the paged cache.
//
// The torch fallback gathers every sequence's blocks into a contiguous copy
// per layer and then runs SDPA over the copy: the KV is read twice and
// written once per step, and that traffic is most of a decode step. Here a
// work item (a sequence, or one KV head of it when the batch is too small to
// keep every thread busy) walks its block table once, block by block, with a
// running ("online") softmax: each block's K rows and then its V rows are
// read while they sit in L1, all KV heads of a row are one contiguous read,
// and the query heads of a group share every load (GQA without expanding
// K/V). float32 only; the caller falls back for anything else.
//
// Op: keyserve::paged_decode_attention(
//     out [B, Hq, D], q [B, Hq, D], k_cache [NB, bs, Hkv, D], v_cache (same),
//     block_tables [B, max_blocks] int64, num_keys [B] int64, scale,
//     logits_out [B, Hq, max_blocks * bs] or an empty tensor)
// logits_out, when given, receives the scaled pre-softmax logits of every
// valid key (slots past num_keys are left as they were): the eviction scores
// for H2O and Keyformer are computed from them without a second pass over K.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "vector_math.h"

namespace {

using keyserve::accumulate_values;
using keyserve::exp_nonpositive;
using keyserve::exp_shifted;
using keyserve::max_of;
using keyserve::f32x16;
using keyserve::load16;
using keyserve::store16;
using keyserve::sum16;

// Query heads per KV head that the vector code keeps in registers; models
// with larger groups take the scalar code.
constexpr int64_t kMaxGroup = 8;

struct Shapes {
  int64_t block_size, num_kv_heads, group, head_dim, max_blocks, logits_width;
};

// Scaled q.k of one KV head's G query heads (q [G, dim]) against `count` key
// rows k + i * stride: scores[g * count + i]. D (a multiple of 16) is a
// compile-time constant for the common head sizes: the queries stay in
// vector registers and each dot product ends in one horizontal sum. D = 0: a
// scalar loop over the runtime head size.
template <int64_t D>
void block_scores(const float* q, const float* k, int64_t stride, int64_t count, int64_t G,
                  int64_t dim, float scale, float* scores) {
  if constexpr (D > 0) {
    constexpr int64_t C = D / 16;
    f32x16 qv[kMaxGroup][C];
    for (int64_t g = 0; g < G; ++g)
      for (int64_t c = 0; c < C; ++c) qv[g][c] = load16(q + g * D + 16 * c);
    for (int64_t i = 0; i < count; ++i) {
      f32x16 kv[C];
      for (int64_t c = 0; c < C; ++c) kv[c] = load16(k + i * stride + 16 * c);
      for (int64_t g = 0; g < G; ++g) {
        // Two accumulators: half the dependent chain of one.
        f32x16 even = qv[g][0] * kv[0], odd = qv[g][1] * kv[1];
        for (int64_t c = 2; c < C; c += 2) {
          even += qv[g][c] * kv[c];
          odd += qv[g][c + 1] * kv[c + 1];
        }
        scores[g * count + i] = sum16(even + odd) * scale;
      }
    }
  } else {
    for (int64_t i = 0; i < count; ++i) {
      const float* row = k + i * stride;
      for (int64_t g = 0; g < G; ++g) {
        const float* qg = q + g * dim;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t d = 0; d < dim; ++d) acc += qg[d] * row[d];
        scores[g * count + i] = acc * scale;
      }
    }
  }
}

// acc[g] = acc[g] * rescale[g] + sum_i p[g * count + i] * v_i, over `count`
// value rows v + i * stride. With D fixed, up to 4 query heads' accumulators
// at a time stay in vector registers for the whole block.
template <int64_t D>
void block_values(const float* p, const float* rescale, const float* v, int64_t stride,
                  int64_t count, int64_t G, int64_t dim, float* acc) {
  if constexpr (D > 0) {
    // The group's rows at once (G is at most kMaxGroup on this path).
    switch (G) {
      case 1: return accumulate_values<D, 1>(p, count, rescale, v, stride, count, acc);
      case 2: return accumulate_values<D, 2>(p, count, rescale, v, stride, count, acc);
      case 3: return accumulate_values<D, 3>(p, count, rescale, v, stride, count, acc);
      case 4: return accumulate_values<D, 4>(p, count, rescale, v, stride, count, acc);
      default:
        for (int64_t g = 0; g < G; g += 4) {
          const int64_t rows = std::min<int64_t>(4, G - g);
          block_values<D>(p + g * count, rescale + g, v, stride, count, rows, dim, acc + g * D);
        }
    }
  } else {
    for (int64_t g = 0; g < G; ++g) {
      float* o = acc + g * dim;
      for (int64_t d = 0; d < dim; ++d) o[d] *= rescale[g];
    }
    for (int64_t i = 0; i < count; ++i) {
      const float* row = v + i * stride;
      for (int64_t g = 0; g < G; ++g) {
        const float pg = p[g * count + i];
        float* o = acc + g * dim;
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) o[d] += pg * row[d];
      }
    }
  }
}

// Asks for the next block's K and V rows while this one is computed: blocks
// lie anywhere in the pool, so the hardware prefetcher, which follows
// addresses within a page, starts cold at each one and the loop would wait
// on memory (2.5x slower at 2k keys, where the KV no longer fits in cache).
inline void prefetch_block(const float* k, const float* v, int64_t floats) {
  constexpr int64_t kLine = 64 / sizeof(float);
  for (int64_t i = 0; i < floats; i += kLine) {
    __builtin_prefetch(k + i, 0, 1);  // into L2: the block is read soon, not at once
    __builtin_prefetch(v + i, 0, 1);
  }
}

// Per-thread buffers, reused across work items.
struct Scratch {
  std::vector<float> scores, rescale, max, sum, acc;
};

// In place: one block's scores [G, count] -> exp(score - running max), with
// the running max and sum of each query head updated and rescale[g] the
// factor the earlier blocks' sums and accumulators shrink by.
void online_softmax(float* scores, int64_t count, int64_t G, float* max, float* sum,
                    float* rescale) {
  for (int64_t g = 0; g < G; ++g) {
    float* row = scores + g * count;
    const float new_max = std::max(max[g], max_of(row, count));
    const float block_sum = exp_shifted(row, row, count, new_max);
    // The first block: max is -inf and sum 0; the factor multiplies zeros.
    rescale[g] = exp_nonpositive(max[g] - new_max);
    sum[g] = sum[g] * rescale[g] + block_sum;
    max[g] = new_max;
  }
}

// KV heads [h0, h1) of one sequence: q, out, logits point at the sequence's
// rows ([Hq, D], [Hq, D], [Hq, logits_width] or null).
template <int64_t D>
void attend_heads(const float* q, const float* k_cache, const float* v_cache,
                  const int64_t* blocks, int64_t n, const Shapes& s, int64_t h0, int64_t h1,
                  float scale, float* logits, float* out, Scratch& w) {
  const int64_t G = s.group, dim = D > 0 ? D : s.head_dim, bs = s.block_size;
  const int64_t stride = s.num_kv_heads * dim, rows = (h1 - h0) * G;
  w.scores.resize(G * bs);
  w.rescale.resize(G);
  w.max.assign(rows, -std::numeric_limits<float>::infinity());
  w.sum.assign(rows, 0.f);
  w.acc.assign(rows * dim, 0.f);
  const int64_t block_floats = bs * stride;
  for (int64_t start = 0, j = 0; start < n; start += bs, ++j) {
    const int64_t count = std::min(bs, n - start);
    const float* kb = k_cache + blocks[j] * block_floats;
    const float* vb = v_cache + blocks[j] * block_floats;
    if (start + bs < n) {
      prefetch_block(k_cache + blocks[j + 1] * block_floats, v_cache + blocks[j + 1] * block_floats,
                     std::min(bs, n - start - bs) * stride);
    }
    for (int64_t h = h0; h < h1; ++h) {
      const int64_t r = (h - h0) * G;  // the head's first row in the running state
      float* sc = w.scores.data();
      block_scores<D>(q + h * G * dim, kb + h * dim, stride, count, G, dim, scale, sc);
      if (logits != nullptr) {
        for (int64_t g = 0; g < G; ++g)
          std::copy(sc + g * count, sc + (g + 1) * count,
                    logits + (h * G + g) * s.logits_width + start);
      }
      online_softmax(sc, count, G, w.max.data() + r, w.sum.data() + r, w.rescale.data());
      block_values<D>(sc, w.rescale.data(), vb + h * dim, stride, count, G, dim,
                      w.acc.data() + r * dim);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const float inv = 1.f / w.sum[r];
    const float* a = w.acc.data() + r * dim;
    float* o = out + (h0 * G + r) * dim;
    for (int64_t d = 0; d < dim; ++d) o[d] = a[d] * inv;
  }
}

void check_inputs(const at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                  const at::Tensor& v_cache, const at::Tensor& block_tables,
                  const at::Tensor& num_keys) {
  for (const auto* t : {&out, &q, &k_cache, &v_cache}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat,
                "float32 CPU tensors only");
    TORCH_CHECK(t->is_contiguous(), "contiguous tensors only");
  }
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && block_tables.is_contiguous(),
              "block_tables must be contiguous int64");
  TORCH_CHECK(num_keys.scalar_type() == at::kLong && num_keys.is_contiguous(),
              "num_keys must be contiguous int64");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4, "q [B, Hq, D], cache [NB, bs, Hkv, D]");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "query heads must be a multiple of KV heads");
}

void paged_decode_attention(at::Tensor out, const at::Tensor& q, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& block_tables,
                            const at::Tensor& num_keys, double scale, at::Tensor logits_out) {
  check_inputs(out, q, k_cache, v_cache, block_tables, num_keys);
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const bool want_logits = logits_out.numel() > 0;
  const Shapes s{k_cache.size(1),      k_cache.size(2),     Hq / k_cache.size(2),
                 D,                    block_tables.size(1), want_logits ? logits_out.size(2) : 0};
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = num_keys.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  float* lp = want_logits ? logits_out.data_ptr<float>() : nullptr;
  const float fscale = static_cast<float>(scale);
  const bool vector = s.group <= kMaxGroup;
  auto attend = !vector      ? &attend_heads<0>
                : D == 64  ? &attend_heads<64>
                : D == 128 ? &attend_heads<128>
                           : &attend_heads<0>;
  // A sequence per work item reads its rows whole; with fewer sequences than
  // two per thread, split them by KV head so that every thread has work.
  const int64_t split = B >= 2 * at::get_num_threads() ? 1 : s.num_kv_heads;
  const int64_t heads_per_item = s.num_kv_heads / split;
  at::parallel_for(0, B * split, 1, [&](int64_t begin, int64_t end) {
    Scratch w;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / split, h0 = (item % split) * heads_per_item;
      const int64_t n = lens[b];
      TORCH_CHECK(n > 0 && n <= s.max_blocks * s.block_size, "num_keys out of range");
      attend(qp + b * Hq * D, kp, vp, tables + b * s.max_blocks, n, s, h0, h0 + heads_per_item,
             fscale, lp != nullptr ? lp + b * Hq * s.logits_width : nullptr, op + b * Hq * D, w);
    }
  });
}

}  // namespace

TORCH_LIBRARY(keyserve, m) {
  m.def(
      "paged_decode_attention(Tensor(a!) out, Tensor q, Tensor k_cache, Tensor v_cache, "
      "Tensor block_tables, Tensor num_keys, float scale, Tensor(b!) logits_out) -> ()");
}

TORCH_LIBRARY_IMPL(keyserve, CPU, m) {
  m.impl("paged_decode_attention", &paged_decode_attention);
}
