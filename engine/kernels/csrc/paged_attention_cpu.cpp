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
// K/V). float32 or bfloat16: q, K, V and out all of one dtype; in bfloat16
// every product and sum is float32 (the rows are widened as they are read,
// or multiplied by AVX-512-BF16's dot-product instruction, whose products
// are exact) and only the output is rounded back.
//
// Op: keyserve::paged_decode_attention(
//     out [B, Hq, D], q [B, Hq, D], k_cache [NB, bs, Hkv, D], v_cache (same),
//     block_tables [B, max_blocks] int64, num_keys [B] int64, scale,
//     logits_out [B, Hq, max_blocks * bs] float32 or an empty tensor)
// logits_out, when given, receives the scaled pre-softmax logits of every
// valid key (slots past num_keys are left as they were): the eviction scores
// for H2O and Keyformer are computed from them without a second pass over K.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "bf16.h"
#include "decode_tiles_bf16.h"
#include "vector_math.h"

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace {

using keyserve::bf16;
using keyserve::elements;
using keyserve::to_f32;
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
// scalar loop over the runtime head size. K is float or bf16 (widened).
template <int64_t D, typename T>
void block_scores(const float* q, const T* k, int64_t stride, int64_t count, int64_t G,
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
      const T* row = k + i * stride;
      for (int64_t g = 0; g < G; ++g) {
        const float* qg = q + g * dim;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t d = 0; d < dim; ++d) acc += qg[d] * to_f32(row[d]);
        scores[g * count + i] = acc * scale;
      }
    }
  }
}

#if defined(__AVX512BF16__)
// bf16 keys on a CPU with AVX-512-BF16: VDPBF16PS multiplies 32 bf16 pairs
// (exact products) into 16 float32 sums, one instruction where widening
// takes four. The queries, bf16 values held as float, are packed back once
// per block, exactly.
template <int64_t D>
void block_scores_dpbf16(const float* q, const bf16* k, int64_t stride, int64_t count, int64_t G,
                         float scale, float* scores) {
  constexpr int64_t C = D / 32;
  __m512bh qv[kMaxGroup][C];
  for (int64_t g = 0; g < G; ++g)
    for (int64_t c = 0; c < C; ++c) {
      const float* qc = q + g * D + 32 * c;
      qv[g][c] = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(qc + 16), _mm512_loadu_ps(qc));
    }
  for (int64_t i = 0; i < count; ++i) {
    __m512bh kv[C];
    for (int64_t c = 0; c < C; ++c) kv[c] = (__m512bh)_mm512_loadu_si512(k + i * stride + 32 * c);
    for (int64_t g = 0; g < G; ++g) {
      // Two accumulators: half the dependent chain of one.
      __m512 even = _mm512_dpbf16_ps(_mm512_setzero_ps(), qv[g][0], kv[0]);
      __m512 odd = _mm512_dpbf16_ps(_mm512_setzero_ps(), qv[g][1], kv[1]);
      for (int64_t c = 2; c < C; c += 2) {
        even = _mm512_dpbf16_ps(even, qv[g][c], kv[c]);
        odd = _mm512_dpbf16_ps(odd, qv[g][c + 1], kv[c + 1]);
      }
      scores[g * count + i] = _mm512_reduce_add_ps(_mm512_add_ps(even, odd)) * scale;
    }
  }
}
#endif

// The scores of one block: AVX-512-BF16 where the build has it, for bf16
// keys of the vector head sizes; the widening loads otherwise.
template <int64_t D, typename T>
void key_scores(const float* q, const T* k, int64_t stride, int64_t count, int64_t G, int64_t dim,
                float scale, float* scores) {
#if defined(__AVX512BF16__)
  if constexpr (D > 0 && std::is_same_v<T, bf16>) {
    return block_scores_dpbf16<D>(q, k, stride, count, G, scale, scores);
  }
#endif
  block_scores<D>(q, k, stride, count, G, dim, scale, scores);
}

// acc[g] = acc[g] * rescale[g] + sum_i p[g * count + i] * v_i, over `count`
// value rows v + i * stride. With D fixed, up to 4 query heads' accumulators
// at a time stay in vector registers for the whole block.
template <int64_t D, typename T>
void block_values(const float* p, const float* rescale, const T* v, int64_t stride,
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
      const T* row = v + i * stride;
      for (int64_t g = 0; g < G; ++g) {
        const float pg = p[g * count + i];
        float* o = acc + g * dim;
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) o[d] += pg * to_f32(row[d]);
      }
    }
  }
}

// Asks for the next block's K and V rows while this one is computed: blocks
// lie anywhere in the pool, so the hardware prefetcher, which follows
// addresses within a page, starts cold at each one and the loop would wait
// on memory (2.5x slower at 2k keys, where the KV no longer fits in cache).
template <typename T>
void prefetch_block(const T* k, const T* v, int64_t elements) {
  constexpr int64_t kLine = 64 / sizeof(T);
  for (int64_t i = 0; i < elements; i += kLine) {
    __builtin_prefetch(k + i, 0, 1);  // into L2: the block is read soon, not at once
    __builtin_prefetch(v + i, 0, 1);
  }
}

// Per-thread buffers, reused across work items.
struct Scratch {
  std::vector<float> scores, rescale, max, sum, acc, q;
  std::vector<uint32_t> pairs;  // bf16 probability pairs (decode_tiles_bf16.h)
  // The first block of the thread's next work item (null after its last);
  // set only for bf16, whose dpbf16 path is the one that prefetches it.
  const void* next_k = nullptr;
  const void* next_v = nullptr;
  int64_t next_elems = 0;

  // A work item's start: the running softmax state of `rows` query rows of
  // `dim` values, and room for a block's scores of one KV head's G rows.
  void start_item(int64_t G, int64_t block_size, int64_t rows, int64_t dim) {
    scores.resize(G * block_size);
    rescale.resize(G);
    max.assign(rows, -std::numeric_limits<float>::infinity());
    sum.assign(rows, 0.f);
    acc.assign(rows * dim, 0.f);
  }
};

// The query rows as float: float32 ones in place, bf16 ones widened into
// the scratch buffer (once per work item, not once per block).
const float* float_rows(const float* q, int64_t, std::vector<float>&) { return q; }

const float* float_rows(const bf16* q, int64_t n, std::vector<float>& buffer) {
  buffer.resize(n);
  keyserve::convert_row(q, buffer.data(), n);
  return buffer.data();
}

// out = acc / sum for each of `rows` rows of `dim`, rounded to T.
template <typename T>
void normalize_rows(const float* acc, const float* sum, int64_t rows, int64_t dim, T* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float inv = 1.f / sum[r];
    const float* a = acc + r * dim;
    T* o = out + r * dim;
    if constexpr (std::is_same_v<T, float>) {
      for (int64_t d = 0; d < dim; ++d) o[d] = a[d] * inv;
    } else {
      for (int64_t d = 0; d < dim; ++d) o[d] = keyserve::to_bf16(a[d] * inv);
    }
  }
}

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
// rows ([Hq, D], [Hq, D], [Hq, logits_width] or null). T: float or bf16.
template <int64_t D, typename T>
void attend_heads(const T* q_rows, const T* k_cache, const T* v_cache, const int64_t* blocks,
                  int64_t n, const Shapes& s, int64_t h0, int64_t h1, float scale, float* logits,
                  T* out, Scratch& w) {
  const int64_t G = s.group, dim = D > 0 ? D : s.head_dim, bs = s.block_size;
  const float* q = float_rows(q_rows, s.num_kv_heads * G * dim, w.q);
  const int64_t stride = s.num_kv_heads * dim, rows = (h1 - h0) * G;
  w.start_item(G, bs, rows, dim);
  const int64_t block_elems = bs * stride;
  for (int64_t start = 0, j = 0; start < n; start += bs, ++j) {
    const int64_t count = std::min(bs, n - start);
    const T* kb = k_cache + blocks[j] * block_elems;
    const T* vb = v_cache + blocks[j] * block_elems;
    if (start + bs < n) {
      prefetch_block(k_cache + blocks[j + 1] * block_elems, v_cache + blocks[j + 1] * block_elems,
                     std::min(bs, n - start - bs) * stride);
    }
    for (int64_t h = h0; h < h1; ++h) {
      const int64_t r = (h - h0) * G;  // the head's first row in the running state
      float* sc = w.scores.data();
      key_scores<D>(q + h * G * dim, kb + h * dim, stride, count, G, dim, scale, sc);
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
  normalize_rows(w.acc.data(), w.sum.data(), rows, dim, out + h0 * G * dim);
}

#if defined(__AVX512BF16__)
// The stretch of memory attend_heads_dpbf16 asks for while it computes a
// block: the sequence's next block, or after its last one the first block
// of the thread's next work item (Scratch::next_k, next_v), so that no block but
// a thread's very first is read cold. Each KV head's pass takes its share.
keyserve::decode::dot::Prefetch head_share(const bf16* k, const bf16* v, int64_t elements,
                                           int64_t h, int64_t heads) {
  const int64_t part = (elements / heads + 31) / 32 * 32, off = h * part;
  if (k == nullptr || off >= elements) return {nullptr, nullptr, 0};
  const auto bytes = static_cast<int64_t>(std::min(part, elements - off) * sizeof(bf16));
  return {reinterpret_cast<const char*>(k + off), reinterpret_cast<const char*>(v + off), bytes};
}

// attend_heads for bf16 caches of head size D (64 or 128) on a CPU with
// AVX-512-BF16: the same walk over the blocks with decode_tiles_bf16.h's
// loops, and the accumulators put back in dimension order at the end.
template <int64_t D>
void attend_heads_dpbf16(const bf16* q, const bf16* k_cache, const bf16* v_cache,
                         const int64_t* blocks, int64_t n, const Shapes& s, int64_t h0,
                         int64_t h1, float scale, float* logits, bf16* out, Scratch& w) {
  namespace dot = keyserve::decode::dot;
  const int64_t G = s.group, bs = s.block_size;
  const int64_t stride = s.num_kv_heads * D, rows = (h1 - h0) * G;
  w.start_item(G, bs, rows, D);
  w.pairs.resize(G * ((bs + 1) / 2));
  const int64_t block_elems = bs * stride;
  for (int64_t start = 0, j = 0; start < n; start += bs, ++j) {
    const int64_t count = std::min(bs, n - start), pairs = (count + 1) / 2;
    const bf16* kb = k_cache + blocks[j] * block_elems;
    const bf16* vb = v_cache + blocks[j] * block_elems;
    const bool last = start + bs >= n;
    const bf16* next_k =
        last ? static_cast<const bf16*>(w.next_k) : k_cache + blocks[j + 1] * block_elems;
    const bf16* next_v =
        last ? static_cast<const bf16*>(w.next_v) : v_cache + blocks[j + 1] * block_elems;
    const int64_t next_elems = last ? w.next_elems : std::min(bs, n - start - bs) * stride;
    for (int64_t h = h0; h < h1; ++h) {
      const int64_t r = (h - h0) * G;
      float* sc = w.scores.data();
      const auto ahead = head_share(next_k, next_v, next_elems, h - h0, h1 - h0);
      dot::key_scores<D>(q + h * G * D, kb + h * D, stride, count, G, scale, sc, ahead);
      if (logits != nullptr) {
        for (int64_t g = 0; g < G; ++g)
          std::copy(sc + g * count, sc + (g + 1) * count,
                    logits + (h * G + g) * s.logits_width + start);
      }
      online_softmax(sc, count, G, w.max.data() + r, w.sum.data() + r, w.rescale.data());
      dot::pair_probabilities(sc, count, G, pairs, w.pairs.data());
      dot::accumulate_values<D>(w.pairs.data(), pairs, w.rescale.data(), vb + h * D, stride,
                                count, G, w.acc.data() + r * D, ahead);
    }
  }
  for (int64_t row = 0; row < rows; ++row) {
    const float inv = 1.f / w.sum[row];
    const float* a = w.acc.data() + row * D;
    bf16* o = out + (h0 * G + row) * D;
    for (int64_t d = 0; d < D; ++d) o[d] = keyserve::to_bf16(a[dot::interleaved_slot(d)] * inv);
  }
}
#endif

// The work item's function for this dtype, head size and group.
template <typename T>
auto attend_function(int64_t D, int64_t group) {
  using Fn = void (*)(const T*, const T*, const T*, const int64_t*, int64_t, const Shapes&,
                      int64_t, int64_t, float, float*, T*, Scratch&);
  if (group > kMaxGroup) return static_cast<Fn>(&attend_heads<0, T>);
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, bf16>) {
    if (D == 64) return static_cast<Fn>(&attend_heads_dpbf16<64>);
    if (D == 128) return static_cast<Fn>(&attend_heads_dpbf16<128>);
  }
#endif
  return D == 64    ? static_cast<Fn>(&attend_heads<64, T>)
         : D == 128 ? static_cast<Fn>(&attend_heads<128, T>)
                    : static_cast<Fn>(&attend_heads<0, T>);
}

void check_inputs(const at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                  const at::Tensor& v_cache, const at::Tensor& block_tables,
                  const at::Tensor& num_keys, const at::Tensor& logits_out) {
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16,
              "float32 or bfloat16 CPU tensors only");
  for (const auto* t : {&out, &q, &k_cache, &v_cache}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == dtype,
                "out, q, k_cache and v_cache: CPU tensors of one dtype (float32 or bfloat16)");
  }
  for (const auto* t : {&out, &k_cache, &v_cache}) {
    TORCH_CHECK(t->is_contiguous(), "out, k_cache and v_cache must be contiguous");
  }
  // q may be a slice of a fused QKV projection's rows: each token's heads
  // contiguous, the tokens any distance apart (a copy of it cost more than
  // 2% of a 64-sequence decode step).
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.stride(1) == q.size(2) &&
                  (q.size(0) == 1 || q.stride(0) >= q.size(1) * q.size(2)),
              "q [B, Hq, D]: each token's Hq * D values contiguous");
  TORCH_CHECK(logits_out.numel() == 0 ||
                  (logits_out.scalar_type() == at::kFloat && logits_out.is_contiguous()),
              "logits_out must be contiguous float32");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && block_tables.is_contiguous(),
              "block_tables must be contiguous int64");
  TORCH_CHECK(num_keys.scalar_type() == at::kLong && num_keys.is_contiguous(),
              "num_keys must be contiguous int64");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4, "q [B, Hq, D], cache [NB, bs, Hkv, D]");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "query heads must be a multiple of KV heads");
}

template <typename T>
void attend_batch(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                  const at::Tensor& v_cache, const at::Tensor& block_tables,
                  const at::Tensor& num_keys, float scale, float* lp, const Shapes& s) {
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), q_stride = q.stride(0);
  const T* qp = elements<T>(q);
  const T* kp = elements<T>(k_cache);
  const T* vp = elements<T>(v_cache);
  T* op = elements<T>(out);
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = num_keys.data_ptr<int64_t>();
  const auto attend = attend_function<T>(D, s.group);
  // A sequence per work item reads its rows whole; with fewer sequences than
  // two per thread, split them by KV head so that every thread has work.
  const int64_t split = B >= 2 * at::get_num_threads() ? 1 : s.num_kv_heads;
  const int64_t heads_per_item = s.num_kv_heads / split;
  at::parallel_for(0, B * split, 1, [&](int64_t begin, int64_t end) {
    Scratch w;
    const int64_t block_elems = s.block_size * s.num_kv_heads * D;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / split, h0 = (item % split) * heads_per_item;
      const int64_t n = lens[b];
      TORCH_CHECK(n > 0 && n <= s.max_blocks * s.block_size, "num_keys out of range");
      if constexpr (std::is_same_v<T, bf16>) {  // only the dpbf16 path prefetches ahead
        const bool more = item + 1 < end;
        const int64_t next_b = more ? (item + 1) / split : b;
        const int64_t first = tables[next_b * s.max_blocks];
        w.next_k = more ? kp + first * block_elems : nullptr;
        w.next_v = more ? vp + first * block_elems : nullptr;
        w.next_elems = more ? std::min(s.block_size, lens[next_b]) * s.num_kv_heads * D : 0;
      }
      attend(qp + b * q_stride, kp, vp, tables + b * s.max_blocks, n, s, h0, h0 + heads_per_item,
             scale, lp != nullptr ? lp + b * Hq * s.logits_width : nullptr, op + b * Hq * D, w);
    }
  });
}

void paged_decode_attention(at::Tensor out, const at::Tensor& q, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& block_tables,
                            const at::Tensor& num_keys, double scale, at::Tensor logits_out) {
  check_inputs(out, q, k_cache, v_cache, block_tables, num_keys, logits_out);
  const bool want_logits = logits_out.numel() > 0;
  const Shapes s{k_cache.size(1),      k_cache.size(2),     q.size(1) / k_cache.size(2),
                 q.size(2),            block_tables.size(1), want_logits ? logits_out.size(2) : 0};
  float* lp = want_logits ? logits_out.data_ptr<float>() : nullptr;
  const float fscale = static_cast<float>(scale);
  if (q.scalar_type() == at::kBFloat16) {
    attend_batch<bf16>(out, q, k_cache, v_cache, block_tables, num_keys, fscale, lp, s);
  } else {
    attend_batch<float>(out, q, k_cache, v_cache, block_tables, num_keys, fscale, lp, s);
  }
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
