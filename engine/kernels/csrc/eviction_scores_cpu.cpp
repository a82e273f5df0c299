// H2O / Keyformer score contributions on the CPU, from precomputed logits.
//
// The attention logits come from a BLAS matmul (prompt) or the decode kernel;
// what is left per (query head, query, key) is elementwise: Keyformer's Gumbel
// noise (a hash of seed, layer, head and both positions, looked up in a
// table), the temperature, a softmax over the query's visible keys, and the
// sum over queries. In torch that is a dozen full-size temporaries per chunk;
// here it is one pass, and only over the causal half of a prompt.
//
// With write_probs (a prompt chunk), the logits are also turned in place into
// the attention probabilities softmax(x) (0 past each query's visible keys),
// so the caller gets the chunk's output from one more matmul, P @ V, instead
// of running attention a second time. At tau = 1 the scores then cost no
// second exp: softmax(x + g) = P * e^g / sum(P * e^g), with e^g read from
// exp_table, the exponentials of noise_table's levels.
//
// Op: keyserve::accumulate_scores(
//     out [B, Hkv, G, S_out] float (added to, S_out >= S: a prompt chunk's
//     logits stop at its last visible key), logits [B, Hkv, G, Q, S] float,
//     num_visible [B, Q] int64 (query q sees keys [0, num_visible)),
//     query_pos [B, Q] int64, key_pos [B, S, Hkv] int64, tau [B, Q] float,
//     seed [B] int64, use_noise [B] bool, layer, noise_table [2^bits] float,
//     exp_table [2^bits] float (or empty), write_probs bool, score_from = 0)
// Queries at query_pos < score_from add no score (an observation window);
// with write_probs they still get their probabilities.
// The noise must equal kv_manager.scoring.gumbel_noise bit for bit
// (eviction_scores.h).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "eviction_scores.h"
#include "vector_math.h"

namespace {

using keyserve::exp_shifted;
using keyserve::max_of;

using keyserve::scores::add_noisy_from_exp;
using keyserve::scores::add_tempered;
using keyserve::scores::check_input;
using keyserve::scores::Noise;
using keyserve::scores::query_term;

struct Dims {
  int64_t B, H, G, Q, S, S_out;
};

// x[0, n) -> softmax(x) in place; x[n, S) -> 0.
void to_probs(float* x, int64_t n, int64_t S) {
  const float inv_sum = 1.f / exp_shifted(x, x, n, max_of(x, n));
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) x[j] *= inv_sum;
  std::fill(x + n, x + S, 0.f);
}

// One work item: add the scores of its Q queries into row [S]; with
// write_probs, leave the attention probabilities in logits.
void score_item(float* logits,             // [Q, S]
                const int64_t* visible,    // [Q]
                const int64_t* query_pos,  // [Q]
                const float* tau,          // [Q]
                const Noise& noise, bool write_probs, int64_t score_from, const Dims& d,
                float* row, std::vector<float>& z) {
  z.resize(d.S);
  for (int64_t q = 0; q < d.Q; ++q) {
    float* x = logits + q * d.S;
    const int64_t n = std::min(visible[q], d.S);
    if (n <= 0) {
      if (write_probs) std::fill(x, x + d.S, 0.f);
      continue;
    }
    if (query_pos[q] < score_from) {
      if (write_probs) to_probs(x, n, d.S);
      continue;
    }
    const uint64_t qbase = noise.base + query_term(query_pos[q]);
    // The shortcut needs tau = 1 and, with noise, the table of e^g.
    const bool from_probs = write_probs && tau[q] == 1.f && (!noise.on || noise.exp_table);
    if (!from_probs) {
      add_tempered(x, n, tau[q], qbase, noise, row, z.data());
      if (write_probs) to_probs(x, n, d.S);
      continue;
    }
    to_probs(x, n, d.S);
    if (noise.on) {
      add_noisy_from_exp(x, n, qbase, noise, row, z.data());
    } else {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) row[j] += x[j];
    }
  }
}

void accumulate_scores(at::Tensor out, at::Tensor logits, const at::Tensor& num_visible,
                       const at::Tensor& query_pos, const at::Tensor& key_pos,
                       const at::Tensor& tau, const at::Tensor& seed, const at::Tensor& use_noise,
                       int64_t layer, const at::Tensor& noise_table, const at::Tensor& exp_table,
                       bool write_probs, int64_t score_from) {
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() == 5 &&
                  logits.scalar_type() == at::kFloat && logits.is_contiguous(),
              "logits: contiguous float32 [B, Hkv, G, Q, S]");
  const Dims d{logits.size(0), logits.size(1), logits.size(2),
               logits.size(3), logits.size(4), out.dim() == 4 ? out.size(3) : -1};
  TORCH_CHECK(out.dim() == 4 && out.size(0) == d.B && out.size(1) == d.H && out.size(2) == d.G &&
                  d.S_out >= d.S && out.device().is_cpu() && out.is_contiguous() &&
                  out.scalar_type() == at::kFloat,
              "out: contiguous float32 [B, Hkv, G, S_out >= S]");
  check_input(num_visible, at::kLong, {d.B, d.Q}, "num_visible: contiguous int64 [B, Q]");
  check_input(query_pos, at::kLong, {d.B, d.Q}, "query_pos: contiguous int64 [B, Q]");
  check_input(key_pos, at::kLong, {d.B, d.S, d.H}, "key_pos: contiguous int64 [B, S, Hkv]");
  check_input(tau, at::kFloat, {d.B, d.Q}, "tau: contiguous float32 [B, Q]");
  check_input(seed, at::kLong, {d.B}, "seed: contiguous int64 [B]");
  check_input(use_noise, at::kBool, {d.B}, "use_noise: contiguous bool [B]");
  const int table_shift = keyserve::scores::check_noise_table(noise_table);
  keyserve::scores::check_exp_table(exp_table, noise_table);

  float* lp = logits.data_ptr<float>();
  const int64_t* vis = num_visible.data_ptr<int64_t>();
  const int64_t* qpos = query_pos.data_ptr<int64_t>();
  const int64_t* kpos = key_pos.data_ptr<int64_t>();
  const float* taup = tau.data_ptr<float>();
  const int64_t* seeds = seed.data_ptr<int64_t>();
  const bool* noise_on = use_noise.data_ptr<bool>();
  const float* table = noise_table.data_ptr<float>();
  const float* exps = exp_table.numel() ? exp_table.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();

  // One work item per (sequence, KV head, query head): disjoint output rows.
  at::parallel_for(0, d.B * d.H * d.G, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> z;
    std::vector<uint64_t> key_hash(d.S);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / (d.H * d.G), h = (item / d.G) % d.H, g = item % d.G;
      const int64_t* keys = kpos + b * d.S * d.H + h;  // [S] at stride H
      for (int64_t j = 0; j < d.S; ++j) key_hash[j] = keyserve::scores::key_term(keys[j * d.H]);
      const Noise noise{table, exps, table_shift, noise_on[b],
                        keyserve::scores::head_term(seeds[b], layer, h * d.G + g),
                        key_hash.data()};
      score_item(lp + item * d.Q * d.S, vis + b * d.Q, qpos + b * d.Q, taup + b * d.Q, noise,
                 write_probs, score_from, d, op + item * d.S_out, z);
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(keyserve, m) {
  m.def(
      "accumulate_scores(Tensor(a!) out, Tensor(b!) logits, Tensor num_visible, "
      "Tensor query_pos, Tensor key_pos, Tensor tau, Tensor seed, Tensor use_noise, int layer, "
      "Tensor noise_table, Tensor exp_table, bool write_probs, int score_from=0) -> ()");
}

TORCH_LIBRARY_IMPL(keyserve, CPU, m) {
  m.impl("accumulate_scores", &accumulate_scores);
}
