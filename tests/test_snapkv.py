"""snapkv and the observation window (issue 23): the engine's kept keys,
scores and tokens equal the dense reference's, with the prompt compressed
while it prefills and in one cut; a window split over chunks that the
batch ended early scores as in one chunk; the window's rule."""

import pytest
import torch
from dense_reference import DenseReference, compare_cuts, record_held
from test_eviction_parity import _run_checked
from tiny_models import build_tiny_model

from engine import LLM, SamplingParams
from kv_manager.policies import KVPolicySettings, pool_neighbours

KV = dict(kv_ratio=0.3, kv_min_tokens=0, recent_ratio=0.25, sink_tokens=2)
CHUNK = 16

# (policy, its extra settings): snapkv at its defaults (window 32, max-pool
# over 7) and with a small window and mean-pooling; Keyformer and H2O with a
# window; generated tokens frozen out of the scores.
VARIANTS = {
    "snapkv": ("snapkv", {}),
    "snapkv-avg": ("snapkv", {"score_window": 12, "snapkv_pooling": "avg", "snapkv_kernel": 5}),
    "snapkv-frozen": ("snapkv", {"score_window": 10, "decode_scoring": "frozen"}),
    "keyformer-window": ("keyformer", {"score_window": 12}),
    "h2o-window-frozen": ("h2o", {"score_window": 20, "decode_scoring": "frozen"}),
}


@pytest.fixture(scope="module", params=["llama", "llama-head-64"])
def small(request, tmp_path_factory):
    """Head size 16 takes the C++ accumulate_scores path; 64 the tiled kernel."""
    return build_tiny_model(request.param, tmp_path_factory.mktemp(request.param))


def _prompt(n: int, seed: int = 7) -> list[int]:
    return torch.randint(3, 250, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _llm(folder, chunk: int) -> LLM:
    return LLM(
        model=str(folder), skip_tokenizer_init=True, dtype="float32", block_size=4,
        kv_cache_blocks=96, max_num_batched_tokens=chunk,
    )  # fmt: skip


def _params(policy: str, extra: dict, **kv) -> SamplingParams:
    fields = {**KV, **kv, **extra}
    return SamplingParams(
        temperature=0.0, seed=11, max_tokens=5, ignore_eos=True, kv_policy=policy, **fields
    )


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_compressed_while_prefilling_equals_the_dense_reference(small, variant):
    policy, extra = VARIANTS[variant]
    llm = _llm(small, CHUNK)
    prompt = _prompt(70)  # budget 21: cut at 32, 48, 64 and 70 (16 is under it)
    checked, _ = compare_cuts(llm, prompt, _params(policy, extra), CHUNK)
    assert checked[:5] == [16, 32, 48, 64, 70] and len(checked) >= 8


@pytest.mark.parametrize("variant", ["snapkv", "snapkv-avg", "keyformer-window"])
def test_one_cut_after_the_prompt_equals_the_dense_reference(small, variant):
    policy, extra = VARIANTS[variant]
    llm = _llm(small, 128)
    checked, _ = compare_cuts(llm, _prompt(90, seed=3), _params(policy, extra), 128)
    assert checked[0] == 90


def test_snapkv_ranks_by_the_window_not_by_every_query(small):
    """The window changes the choice: snapkv without pooling keeps other keys
    than h2o, and the prompt's early queries add nothing to any score."""
    llm = _llm(small, 128)
    prompt = _prompt(90, seed=3)
    _, snap = record_held(llm, prompt, _params("snapkv", {"snapkv_kernel": 1}, kv_ratio=1.0))
    _, h2o = record_held(llm, prompt, _params("h2o", {}, kv_ratio=1.0))
    # Nothing evicted at the prompt's end (budget = prompt): every key held.
    scores, positions = snap[90]
    assert positions.shape[-1] == 90
    # Each of the window's 32 rows adds one per query head: 32 x G per KV head.
    group = llm.engine.model.attention_layers()[0].num_heads // positions.shape[1]
    torch.testing.assert_close(scores.sum(-1), torch.full(scores.shape[:2], 32.0 * group))
    assert not torch.allclose(scores, h2o[90][0])


def test_a_window_over_several_chunks_scores_as_one_chunk(small):
    """A prompt within its budget is never cut while it prefills: in chunks
    of 16 (the window of 24 spans two) its scores equal one chunk's."""
    prompt = _prompt(40, seed=5)
    params = _params("snapkv", {"score_window": 24}, kv_ratio=1.0)
    _, chunked = record_held(_llm(small, CHUNK), prompt, params)
    _, whole = record_held(_llm(small, 64), prompt, params)
    assert chunked[40][1].shape[-1] == 40
    torch.testing.assert_close(chunked[40][1], whole[40][1], rtol=0, atol=0)
    torch.testing.assert_close(chunked[40][0], whole[40][0], rtol=1e-5, atol=1e-6)


def test_a_mixed_batch_with_snapkv_equals_the_dense_reference(small):
    llm = _llm(small, 24)
    lengths = [40, 31, 55, 36]
    prompts = [_prompt(n, seed=n) for n in lengths]
    variants = ["snapkv", "keyformer-window", "snapkv-frozen", "h2o-window-frozen"]
    params = [_params(*VARIANTS[v]) for v in variants]
    results, checker = _run_checked(llm, prompts, params)
    assert checker.evicted_somewhere
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        fields = {k: getattr(p, k) for k in p.kv_overrides()}
        reference = DenseReference(llm.engine.model, KVPolicySettings(**fields))
        assert results[str(i)] == reference.generate(prompt, p, chunk=24), variants[i]


# -- the rules -------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt_len, budget, chunk_start, want",
    [
        (70, 21, 0, 32 - 12),  # 16 is under the budget: the first cut is at 32
        (70, 21, 16, 32 - 12),
        (70, 21, 32, 48 - 12),
        (70, 21, 64, 70 - 12),  # the prompt's end
        (40, 40, 16, 40 - 12),  # within the budget: only the prompt's end
        (40, None, 0, 40 - 12),
        (8, 4, 0, 0),  # a window longer than the prompt: every query
        (70, 21, 70, 0),  # generated tokens (the decode rule decides)
    ],
)
def test_window_start(prompt_len, budget, chunk_start, want):
    s = KVPolicySettings(kv_policy="h2o", score_window=12)
    assert s.window_start(prompt_len, budget, chunk_start, 16) == want


def test_snapkv_window_defaults_to_32_and_others_to_every_query():
    assert KVPolicySettings(kv_policy="snapkv").window_start(100, 50, 96, 2048) == 68
    assert KVPolicySettings(kv_policy="keyformer").window_start(100, 50, 96, 2048) == 0
    with pytest.raises(ValueError, match="score_window must be at least 1"):
        KVPolicySettings(kv_policy="snapkv", score_window=0)


def test_pooling_sorts_by_position_and_skips_the_non_candidates():
    # Slots out of position order, as after a compaction.
    positions = torch.tensor([[[4, 0, 3, 1, 2, 9]]])
    scores = torch.tensor([[[1.0, 5.0, 0.0, 0.0, 2.0, 100.0]]])
    candidates = positions < 9  # position 9 is in the recent window
    by_max = pool_neighbours(scores, positions, candidates, 3, "max")
    # Position order 0..4 holds 5, 0, 2, 0, 1: max over +-1 is 5, 5, 2, 2, 1.
    assert by_max[0, 0, :5].tolist() == [1.0, 5.0, 2.0, 5.0, 2.0]
    by_mean = pool_neighbours(scores, positions, candidates, 3, "avg")
    torch.testing.assert_close(by_mean[0, 0, :5], torch.tensor([1.0, 5.0, 3.0, 7.0, 2.0]) / 3)
