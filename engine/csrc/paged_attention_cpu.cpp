// Decode attention on the CPU, reading K and V in place from the paged cache.
//
// The torch fallback gathers every sequence's blocks into a contiguous copy
// per layer and then runs SDPA over the copy: the KV is read twice and
// written once per step, and that traffic is most of a decode step. Here each
// (sequence, KV head) work item walks its block table once for K and once for
// V, with the query heads of its group sharing each load (GQA without
// expanding K/V). float32 only; the caller falls back for anything else.
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
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

struct Shapes {
  int64_t block_size, num_kv_heads, group, head_dim, max_blocks, logits_width;
};

// Calls f(t, row) for the first n slots of a block table, where row points at
// slot t's vector for `head`; walks block by block (no division per slot).
template <typename F>
inline void for_each_slot(const float* cache, const int64_t* blocks, int64_t n, const Shapes& s,
                          int64_t head, F&& f) {
  const int64_t row_stride = s.num_kv_heads * s.head_dim;
  for (int64_t start = 0, j = 0; start < n; start += s.block_size, ++j) {
    const float* base = cache + blocks[j] * s.block_size * row_stride + head * s.head_dim;
    const int64_t count = std::min(s.block_size, n - start);
    for (int64_t i = 0; i < count; ++i) f(start + i, base + i * row_stride);
  }
}

// Scaled q.k for every valid key of one (sequence, KV head): scores[g * n + t].
// D is a compile-time constant for the common head sizes (0: read it from s),
// so the dot products unroll into straight vector code.
template <int64_t D>
void key_pass(const float* q, const float* k_cache, const int64_t* blocks, int64_t n,
              const Shapes& s, int64_t head, float scale, float* scores) {
  const int64_t G = s.group, dim = D > 0 ? D : s.head_dim;
  for_each_slot(k_cache, blocks, n, s, head, [&](int64_t t, const float* k) {
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = q + g * dim;
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t d = 0; d < dim; ++d) acc += qg[d] * k[d];
      scores[g * n + t] = acc * scale;
    }
  });
}

// In place: scores -> exp(score - max), the rows' softmax numerators;
// inv_sum[g] = 1 / their sum.
void softmax_rows(float* scores, int64_t n, int64_t G, float* inv_sum) {
  for (int64_t g = 0; g < G; ++g) {
    float* row = scores + g * n;
    const float m = *std::max_element(row, row + n);
    float sum = 0.f;
    // Vectorized through glibc's vector math library (needs -fno-math-errno).
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < n; ++t) {
      row[t] = std::exp(row[t] - m);
      sum += row[t];
    }
    inv_sum[g] = 1.f / sum;
  }
}

// out[g] = sum_t p[g, t] * v_t / sum_t p[g, t].
template <int64_t D>
void value_pass(const float* probs, const float* inv_sum, const float* v_cache,
                const int64_t* blocks, int64_t n, const Shapes& s, int64_t head, float* out) {
  const int64_t G = s.group, dim = D > 0 ? D : s.head_dim;
  std::fill(out, out + G * dim, 0.f);
  for_each_slot(v_cache, blocks, n, s, head, [&](int64_t t, const float* v) {
    for (int64_t g = 0; g < G; ++g) {
      const float p = probs[g * n + t];
      float* o = out + g * dim;
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) o[d] += p * v[d];
    }
  });
  for (int64_t g = 0; g < G; ++g) {
    float* o = out + g * dim;
    for (int64_t d = 0; d < dim; ++d) o[d] *= inv_sum[g];
  }
}

// One (sequence, KV head): its G query heads' attention over n cached keys.
template <int64_t D>
void attend_one(const float* q, const float* k_cache, const float* v_cache,
                const int64_t* blocks, int64_t n, const Shapes& s, int64_t head, float scale,
                float* scores, float* inv_sum, float* logits_rows, float* out) {
  key_pass<D>(q, k_cache, blocks, n, s, head, scale, scores);
  if (logits_rows != nullptr) {
    for (int64_t g = 0; g < s.group; ++g)
      std::copy(scores + g * n, scores + (g + 1) * n, logits_rows + g * s.logits_width);
  }
  softmax_rows(scores, n, s.group, inv_sum);
  value_pass<D>(scores, inv_sum, v_cache, blocks, n, s, head, out);
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
  auto attend = D == 64 ? &attend_one<64> : D == 128 ? &attend_one<128> : &attend_one<0>;

  // One work item per (sequence, KV head); each writes only its own rows.
  at::parallel_for(0, B * s.num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, inv_sum(s.group);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / s.num_kv_heads, h = item % s.num_kv_heads;
      const int64_t n = lens[b];
      TORCH_CHECK(n > 0 && n <= s.max_blocks * s.block_size, "num_keys out of range");
      scores.resize(s.group * n);
      const int64_t first = b * Hq + h * s.group;  // the group's first query head
      float* logits_rows = lp != nullptr ? lp + first * s.logits_width : nullptr;
      attend(qp + first * D, kp, vp, tables + b * s.max_blocks, n, s, h, fscale, scores.data(),
             inv_sum.data(), logits_rows, op + first * D);
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
