// Causal attention of a prompt chunk that also adds its H2O / Keyformer
// scores: every key's attention probability (Keyformer: noisy, tempered)
// summed over the chunk's queries and the query heads of its KV head.
//
// A score needs each query row's softmax normalized over all its visible
// keys before it can be added to a key, which an online softmax only knows
// at the end. So each tile of queries keeps its whole rows of logits: 16
// queries x G heads x S keys (400 KB for SmolLM2 at 2,048 keys, within L2),
// computed 64 keys at a time by the same micro-kernels as the flash kernel
// (prompt_tiles.h). A row is then exponentiated once: its attention
// probabilities (up to a factor) give the score, and P @ V runs over the
// row in 64-key tiles. Nothing of the size [heads, queries, keys] ever
// reaches memory, where the BLAS path wrote the logits, read and rewrote
// them as probabilities, and read them again for P @ V.
//
// Scores are added per work item into its own row of a buffer and summed in
// a fixed order at the end, so they do not depend on the thread count.
//
// float32 or bfloat16 q, k, v and out (one dtype): in bfloat16 the tiles are
// prompt_paths.h's choice; the logits, the probabilities the scores sum and
// the scores themselves are float32 either way, from the same noise and tau.
//
// Op: keyserve::prefill_attention_scored(out [n, Hq, D], scores [Hkv, S]
//     (added to), q [n, Hq, D], k [S, Hkv, D], v [S, Hkv, D], scale,
//     query_pos [n] int64, key_pos [S, Hkv] int64, tau [n] float32, seed,
//     use_noise, layer, noise_table, exp_table (or empty), score_from = 0):
//     query i sees keys [0, S - n + i]; out, q, k, v: all float32 or all
//     bfloat16, scores float32. With use_noise, Keyformer's
//     softmax((x + g) / tau); without, H2O's softmax(x / tau) (tau is 1 for
//     H2O). Only queries at query_pos >= score_from add to the scores (an
//     observation window: SnapKV's last prompt queries); the others attend
//     and skip the score's work.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "bf16.h"
#include "eviction_scores.h"
#include "prompt_paths.h"
#include "vector_math.h"

namespace {

using keyserve::bf16;
using keyserve::elements;
using keyserve::exp_shifted;
using keyserve::max_of;
using keyserve::prompt::kKeys;
using keyserve::prompt::kQueries;
using keyserve::prompt::Path;
using keyserve::scores::check_input;
using keyserve::scores::Noise;

// Score rows per KV head at most: bounds the buffer that makes the sum's
// order fixed.
constexpr int64_t kMaxGroups = 16;

template <typename T>
struct Views {
  using P = Path<T>;
  const T* q;
  const typename P::Key* kt;  // K packed in tiles, [Hkv][tiles][words][64]
  const typename P::Value* v;
  T* out;
  const int64_t *query_pos, *key_pos;  // [n], [S, Hkv]
  const float* tau;                    // [n]
  int64_t q_stride, v_stride, v_head_stride, out_stride;
  int64_t key_tiles, n, S, H, G, offset;  // offset = S - n
  float scale;
  int64_t seed, layer;
  int64_t score_from;  // queries before this position add no score
  Noise noise;  // base and key_hash are set per query head and work item
};

// Per-thread buffers: whole logit rows, P @ V accumulators, scratch.
template <int64_t D, typename T>
struct Rows {
  int64_t stride;  // floats between logit rows: S rounded up to whole key tiles
  std::vector<typename Path<T>::Query> q;
  std::vector<float> p, acc, inv, ones, z;
  std::vector<bf16> p16;  // a key tile of P rounded for the bf16 dot products
  std::vector<uint64_t> key_hash;
  Rows(int64_t rows, int64_t key_tiles, int64_t S)
      : stride(key_tiles * kKeys),
        q(rows * D),
        p(rows * stride),
        acc(rows * D),
        inv(rows),
        ones(rows, 1.f),
        z(stride),
        p16(rows * kKeys),
        key_hash(S) {}
};

// x[0, n) -> exp(x - max) in place; adds the row's score to score[0, n)
// (none when score is null: a row outside the observation window) and
// returns 1 / sum of the exponentials (the output's normalizer).
float exp_and_score(float* x, int64_t n, float tau, uint64_t qbase, const Noise& noise,
                    float* score, float* z) {
  if (score == nullptr) return 1.f / exp_shifted(x, x, n, max_of(x, n));
  // Keyformer at tau = 1 reuses the attention exponentials: softmax(x + g)
  // is exp(x) * e^g, renormalized. Otherwise the score is its own softmax.
  const bool shortcut = tau == 1.f && (!noise.on || noise.exp_table);
  if (!shortcut) keyserve::scores::add_tempered(x, n, tau, qbase, noise, score, z);
  const float inv = 1.f / exp_shifted(x, x, n, max_of(x, n));
  if (!shortcut) return inv;
  if (noise.on) {
    keyserve::scores::add_noisy_from_exp(x, n, qbase, noise, score, z);
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) score[j] += x[j] * inv;
  }
  return inv;
}

// One tile: the queries [i0, i1) of every query head over KV head h; their
// scores are added to score [S] (noise.key_hash: h's key terms).
template <int64_t D, typename T>
void attend_and_score_tile(const Views<T>& x, const Noise& noise, int64_t h, int64_t i0,
                           int64_t i1, Rows<D, T>& t, float* score) {
  using P = Path<T>;
  const int64_t nq = i1 - i0, rows = x.G * nq;
  P::template load_queries<D>(x.q, x.q_stride, h, x.G, i0, nq, x.scale, t.q.data());
  const int64_t width = std::min(x.S, x.offset + i1);  // keys the last query sees
  const auto* kt = x.kt + h * x.key_tiles * D * kKeys;
  for (int64_t j0 = 0; j0 < width; j0 += kKeys) {
    P::template score_tile<D>(t.q.data(), kt + j0 * D, t.p.data() + j0, t.stride, rows,
                              x.scale);
  }
  for (int64_t g = 0; g < x.G; ++g) {
    Noise head = noise;
    head.base = keyserve::scores::head_term(x.seed, x.layer, h * x.G + g);
    for (int64_t r = 0; r < nq; ++r) {
      const int64_t m = g * nq + r, i = i0 + r, visible = x.offset + i + 1;
      float* row = t.p.data() + m * t.stride;
      const uint64_t qbase = head.base + keyserve::scores::query_term(x.query_pos[i]);
      float* row_score = x.query_pos[i] >= x.score_from ? score : nullptr;
      t.inv[m] = exp_and_score(row, visible, x.tau[i], qbase, head, row_score, t.z.data());
      std::fill(row + visible, row + width, 0.f);  // P @ V runs to the last query's width
    }
  }
  std::fill(t.acc.begin(), t.acc.begin() + rows * D, 0.f);
  for (int64_t j0 = 0; j0 < width; j0 += kKeys) {
    P::template accumulate_tile<D>(t.p.data() + j0, t.stride, t.ones.data(),
                                   x.v + j0 * x.v_stride + h * x.v_head_stride, x.v_stride,
                                   std::min(kKeys, width - j0), t.acc.data(), rows,
                                   t.p16.data());
  }
  for (int64_t g = 0; g < x.G; ++g)
    for (int64_t r = 0; r < nq; ++r) {
      const int64_t m = g * nq + r;
      T* o = x.out + (i0 + r) * x.out_stride + (h * x.G + g) * D;
      keyserve::prompt::store_output<D>(t.acc.data() + m * D, t.inv[m], o);
    }
}

// partial [H, groups, S] -> scores [H, S] += the sum over groups, in order.
void add_partials(const at::Tensor& partial, at::Tensor& scores) {
  const int64_t H = partial.size(0), groups = partial.size(1), S = partial.size(2);
  const float* src = partial.data_ptr<float>();
  float* dst = scores.data_ptr<float>();
  at::parallel_for(0, H * S, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      const int64_t h = e / S, j = e % S;
      float sum = 0.f;
      for (int64_t c = 0; c < groups; ++c) sum += src[(h * groups + c) * S + j];
      dst[e] += sum;
    }
  });
}

template <int64_t D, typename T>
void run(const Views<T>& x, at::Tensor& scores) {
  const int64_t tiles = (x.n + kQueries - 1) / kQueries;
  // Pairs of query tiles from both ends balance the causal work (as in the
  // flash kernel); consecutive pairs form a group, which owns a score row.
  const int64_t pairs = (tiles + 1) / 2;
  const int64_t per_group = (pairs + kMaxGroups - 1) / kMaxGroups;
  const int64_t groups = (pairs + per_group - 1) / per_group;
  at::Tensor partial = at::zeros({x.H, groups, x.S}, scores.options());
  float* rows_out = partial.data_ptr<float>();
  at::parallel_for(0, x.H * groups, 1, [&](int64_t begin, int64_t end) {
    Rows<D, T> t(x.G * kQueries, x.key_tiles, x.S);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t h = item / groups, group = item % groups;
      Noise noise = x.noise;
      if (noise.on) {
        for (int64_t j = 0; j < x.S; ++j)
          t.key_hash[j] = keyserve::scores::key_term(x.key_pos[j * x.H + h]);
        noise.key_hash = t.key_hash.data();
      }
      float* score = rows_out + item * x.S;
      const int64_t last = std::min(pairs, (group + 1) * per_group);
      for (int64_t first = group * per_group; first < last; ++first) {
        const int64_t second = tiles - 1 - first;
        attend_and_score_tile<D>(x, noise, h, first * kQueries,
                                 std::min(x.n, (first + 1) * kQueries), t, score);
        if (second != first) {  // an odd count's middle tile runs once
          attend_and_score_tile<D>(x, noise, h, second * kQueries,
                                   std::min(x.n, (second + 1) * kQueries), t, score);
        }
      }
    }
  });
  add_partials(partial, scores);
}

template <typename T>
void attend_and_score(at::Tensor& out, at::Tensor& scores, const at::Tensor& q,
                      const at::Tensor& k, const at::Tensor& v, float scale,
                      const at::Tensor& query_pos, const at::Tensor& key_pos,
                      const at::Tensor& tau, int64_t seed, int64_t layer, int64_t score_from,
                      const Noise& noise) {
  const int64_t n = q.size(0), Hq = q.size(1), D = q.size(2), S = k.size(0), Hkv = k.size(1);
  const auto packed = Path<T>::pack(k, v, D);
  const Views<T> x{elements<T>(q), packed.kt, packed.v, elements<T>(out),
                   query_pos.data_ptr<int64_t>(), key_pos.data_ptr<int64_t>(),
                   tau.data_ptr<float>(), q.stride(0), packed.v_stride, packed.v_head_stride,
                   out.stride(0), packed.key_tiles, n, S, Hkv, Hq / Hkv, S - n, scale, seed,
                   layer, score_from, noise};
  if (D == 64) {
    run<64>(x, scores);
  } else {
    run<128>(x, scores);
  }
}

void prefill_attention_scored(at::Tensor out, at::Tensor scores, const at::Tensor& q,
                              const at::Tensor& k, const at::Tensor& v, double scale,
                              const at::Tensor& query_pos, const at::Tensor& key_pos,
                              const at::Tensor& tau, int64_t seed, bool use_noise, int64_t layer,
                              const at::Tensor& noise_table, const at::Tensor& exp_table,
                              int64_t score_from) {
  keyserve::prompt::check_prompt_shapes(out, q, k, v);
  const int64_t n = q.size(0), S = k.size(0), Hkv = k.size(1);
  check_input(scores, at::kFloat, {Hkv, S}, "scores: contiguous float32 [Hkv, S]");
  check_input(query_pos, at::kLong, {n}, "query_pos: contiguous int64 [n]");
  check_input(key_pos, at::kLong, {S, Hkv}, "key_pos: contiguous int64 [S, Hkv]");
  check_input(tau, at::kFloat, {n}, "tau: contiguous float32 [n]");
  const int shift = keyserve::scores::check_noise_table(noise_table);
  keyserve::scores::check_exp_table(exp_table, noise_table);
  if (n == 0) return;
  const Noise noise{noise_table.data_ptr<float>(),
                    exp_table.numel() ? exp_table.data_ptr<float>() : nullptr,
                    shift,
                    use_noise,
                    0,
                    nullptr};
  const float fscale = static_cast<float>(scale);
  if (q.scalar_type() == at::kBFloat16) {
    attend_and_score<bf16>(out, scores, q, k, v, fscale, query_pos, key_pos, tau, seed, layer,
                           score_from, noise);
  } else {
    attend_and_score<float>(out, scores, q, k, v, fscale, query_pos, key_pos, tau, seed, layer,
                            score_from, noise);
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(keyserve, m) {
  m.def(
      "prefill_attention_scored(Tensor(a!) out, Tensor(b!) scores, Tensor q, Tensor k, "
      "Tensor v, float scale, Tensor query_pos, Tensor key_pos, Tensor tau, int seed, "
      "bool use_noise, int layer, Tensor noise_table, Tensor exp_table, int score_from=0) -> ()");
}

TORCH_LIBRARY_IMPL(keyserve, CPU, m) {
  m.impl("prefill_attention_scored", &prefill_attention_scored);
}
