"""The observation window in the prompt scoring kernels (issue 23): only the
query rows at positions >= score_from add to the scores, in the C++ tiled
scored prefill (float32 and bfloat16), the C++ accumulate_scores path, and
the torch path; the rows before the window still attend. A prompt scored in
chunks adds up to what it scores in one."""

import pytest
import torch
import torch.nn.functional as F

from engine.attention.context import PrefillSpan
from engine.attention.geometry import LayerCache, LayerGeometry
from engine.attention.scoring import ScoreSpec, add_prompt_scores
from engine.kernels import cpu as cpu_kernels
from kv_manager.scoring import gumbel_exp_table, gumbel_noise, gumbel_table, step_scores

needs_kernels = pytest.mark.skipif(
    cpu_kernels.prefill_attention_scored() is None, reason="no C++ toolchain"
)
SEED, LAYER = 2**40 + 3, 2


def _inputs(n: int, S: int, Hq: int, Hkv: int, D: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, Hq, D, generator=g)
    k = torch.randn(S, Hkv, D, generator=g)
    v = torch.randn(S, Hkv, D, generator=g)
    # A later chunk after S - n cached keys; positions run on from them.
    query_pos = torch.arange(n) + (S - n) + 100
    key_pos = (torch.arange(S) + 100).view(S, 1).expand(S, Hkv).contiguous()
    return q, k, v, query_pos, key_pos


def _reference(q, k, key_pos, query_pos, tau, use_noise, scale, score_from):
    """[Hkv, S] from kv_manager.scoring on explicit logits, the rows before
    score_from left out."""
    n, Hq, _ = q.shape
    S, Hkv, _ = k.shape
    G = Hq // Hkv
    logits = torch.einsum("nhd,shd->hns", q.float(), k.float().repeat_interleave(G, 1)) * scale
    visible = torch.arange(S).view(1, S) <= (torch.arange(n) + S - n).view(n, 1)
    logits = logits.masked_fill(~visible, float("-inf"))
    noise = None
    if use_noise:
        kp = key_pos.transpose(0, 1).repeat_interleave(G, dim=0).view(Hq, 1, S)
        head = torch.arange(Hq).view(Hq, 1, 1)
        noise = gumbel_noise(torch.tensor(SEED), LAYER, head, query_pos.view(1, n, 1), kp)
    probs = step_scores(logits, tau.view(1, n, 1), noise)
    probs = probs * (query_pos >= score_from).view(1, n, 1)
    return probs.sum(1).view(Hkv, G, S).sum(1)


def _causal(q, k, v, scale):
    n, S = q.shape[0], k.shape[0]
    visible = torch.arange(S).view(1, S) <= (torch.arange(n) + S - n).view(n, 1)
    out = F.scaled_dot_product_attention(
        q.float().transpose(0, 1), k.float().transpose(0, 1), v.float().transpose(0, 1),
        attn_mask=visible, scale=scale, enable_gqa=True,
    )  # fmt: skip
    return out.transpose(0, 1)


def _tiled(q, k, v, query_pos, key_pos, tau, use_noise, scale, score_from):
    out = torch.empty_like(q)
    scores = torch.zeros(k.shape[1], k.shape[0])
    cpu_kernels.prefill_attention_scored()(
        out, scores, q, k, v, scale, query_pos, key_pos, tau, SEED, use_noise, LAYER,
        gumbel_table(), gumbel_exp_table(), score_from=score_from,
    )  # fmt: skip
    return out, scores


@needs_kernels
@pytest.mark.parametrize(
    "n, S, window, policy",
    # The window inside one query tile, across tiles, the whole chunk, none
    # of it (a window past the chunk's end scores nothing), Keyformer's
    # tempered path.
    [(40, 40, 7, "h2o"), (70, 90, 33, "keyformer"), (20, 20, 64, "h2o"), (30, 50, 0, "h2o"),
     (50, 50, 20, "keyformer_tau")],
)  # fmt: skip
def test_tiled_scored_prefill_scores_only_the_window_float32(n, S, window, policy):
    q, k, v, query_pos, key_pos = _inputs(n, S, 6, 2, 64, seed=n + window)
    tau = 1 + torch.rand(n) if policy == "keyformer_tau" else torch.ones(n)
    use_noise, scale = policy != "h2o", 64**-0.5
    score_from = int(query_pos[-1]) + 1 - window
    out, scores = _tiled(q, k, v, query_pos, key_pos, tau, use_noise, scale, score_from)
    torch.testing.assert_close(out, _causal(q, k, v, scale), rtol=1e-5, atol=1e-5)
    want = _reference(q, k, key_pos, query_pos, tau, use_noise, scale, score_from)
    torch.testing.assert_close(scores, want, rtol=1e-5, atol=1e-5)
    if window == 0:
        assert scores.abs().max() == 0
    else:  # the window's rows alone: the total is G heads x the window's rows
        assert float(scores.sum()) == pytest.approx(3 * 2 * min(window, n), rel=1e-5)


@needs_kernels
def test_tiled_scored_prefill_scores_only_the_window_bfloat16():
    q, k, v, query_pos, key_pos = _inputs(64, 80, 6, 2, 64, seed=5)
    q, k, v = (t.bfloat16() for t in (q, k, v))
    tau, scale = torch.ones(64), 64**-0.5
    score_from = int(query_pos[-1]) + 1 - 24
    out, scores = _tiled(q, k, v, query_pos, key_pos, tau, True, scale, score_from)
    torch.testing.assert_close(out.float(), _causal(q, k, v, scale), rtol=2e-2, atol=2e-2)
    want = _reference(q, k, key_pos, query_pos, tau, True, scale, score_from)
    torch.testing.assert_close(scores, want, rtol=2e-2, atol=2e-3)
    # No row before the window adds: its keys past the window's reach are 0.
    assert float(scores.sum()) == pytest.approx(3 * 2 * 24, rel=1e-3)


@needs_kernels
def test_accumulate_scores_skips_rows_before_the_window_but_writes_their_probabilities():
    n, S, H, G = 12, 20, 2, 3
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(1, H, G, n, S, generator=g)
    visible = (torch.arange(n) + S - n + 1).view(1, n)
    query_pos = (torch.arange(n) + 50).view(1, n)
    key_pos = torch.arange(S).view(1, S, 1).expand(1, S, H).contiguous()
    out = torch.zeros(1, H, G, S)
    probs = logits.clone()
    cpu_kernels.accumulate_scores()(
        out, probs, visible, query_pos, key_pos, torch.ones(1, n), torch.tensor([SEED]),
        torch.tensor([False]), LAYER, gumbel_table(), gumbel_exp_table(), True, score_from=58,
    )  # fmt: skip
    mask = torch.arange(S).view(1, S) < visible.view(n, 1)
    want_probs = torch.softmax(logits.masked_fill(~mask, float("-inf")), -1)
    torch.testing.assert_close(probs, want_probs, rtol=1e-6, atol=1e-6)
    want = (want_probs * (query_pos.view(n, 1) >= 58)).sum(3)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)


def _torch_scores(q, k, key_pos, query_pos, slot_start, score_from, policy):
    """add_prompt_scores (the torch path) of one chunk into a fresh cache."""
    n, Hq, D = q.shape
    S, Hkv, _ = k.shape
    geo = LayerGeometry(Hq, Hkv, D, D**-0.5, alibi_slopes=None, sliding_window=None)
    cache = LayerCache(
        LAYER, torch.zeros(S, 1, Hkv, D), torch.zeros(S, 1, Hkv, D),
        torch.zeros(S, 1, Hkv), key_pos.view(S, 1, Hkv).int(),
    )  # fmt: skip
    gumbel = policy == "keyformer"
    spec = ScoreSpec(SEED, gumbel, 10**6, 1.0, 0.0, score_from)
    span = PrefillSpan(
        token_start=0, num_tokens=n, slot_start=slot_start, block_table=None,
        query_positions=query_pos, key_slots=torch.arange(S), score=spec,
    )  # fmt: skip
    add_prompt_scores(geo, cache, q, k, key_pos.view(1, S, Hkv), span)
    return cache.scores.view(S, Hkv).transpose(0, 1)


@pytest.mark.parametrize("policy", ["h2o", "keyformer"])
def test_torch_path_scores_only_the_window(policy):
    q, k, _, query_pos, key_pos = _inputs(150, 170, 4, 2, 16, seed=3)  # > one query chunk
    score_from = int(query_pos[-1]) + 1 - 40
    got = _torch_scores(q, k, key_pos, query_pos, 20, score_from, policy)
    want = _reference(q, k, key_pos, query_pos, torch.ones(150), policy != "h2o", 0.25, score_from)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@needs_kernels
def test_a_window_across_two_chunks_scores_as_one_chunk():
    """The prompt in two chunks split inside the window (the second one's
    keys on top of the first's) adds up to the whole prompt in one."""
    n, split, window = 90, 70, 32
    q, k, v, query_pos, key_pos = _inputs(n, n, 6, 2, 64, seed=11)
    tau, scale = torch.ones(n), 64**-0.5
    score_from = int(query_pos[-1]) + 1 - window
    _, whole = _tiled(q, k, v, query_pos, key_pos, tau, True, scale, score_from)
    head = (q[:split], k[:split], v[:split], query_pos[:split], key_pos[:split].contiguous())
    _, first = _tiled(*head, tau[:split], True, scale, score_from)
    _, second = _tiled(
        q[split:], k, v, query_pos[split:], key_pos, tau[split:], True, scale, score_from
    )
    chunked = second.clone()
    chunked[:, :split] += first
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
    assert float(first.sum()) == pytest.approx(3 * 2 * (window - (n - split)), rel=1e-5)
