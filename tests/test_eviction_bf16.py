"""The engine in bfloat16 evicts the keys the dense reference in bfloat16 picks,
wherever the competing scores are not within bfloat16 rounding of each other.

In float32 the engine reproduces the dense reference's tokens exactly
(test_eviction_parity.py). In bfloat16 the two round at different points
(the engine's C++ kernels against torch's ops), so their scores agree only
up to rounding, and a near-tie may fall either way. So the reference runs on
the engine's own bfloat16 model, follows the engine's tokens, and at every
cut checks, per (layer, kv-head), the keys the engine kept against the
reference's scores; then it adopts the engine's choice (the same state going
into the next step), so one legitimate near-tie does not derail every
later comparison.
"""

import math
from dataclasses import dataclass, field

import pytest
import torch
from dense_reference import DenseReference
from test_eviction_parity import KV, MAX_TOKENS, _params, _prompts
from tiny_models import build_tiny_model

from engine import LLM, SamplingParams
from kv_manager.policies import KVPolicySettings

# llama: head size 16 (torch attention); llama-head-64: the C++ bfloat16
# prompt and decode kernels, scored ones included.
FAMILIES = ["llama", "llama-head-64"]
POLICIES = ["h2o", "keyformer"]

# When are two scores "within bfloat16 rounding of each other"?
# A score is a sum of softmax probabilities, and d p_j = p_j (d l_j - sum_i p_i
# d l_i): a shift of the logits by at most d moves each probability, and so
# any sum of them, by at most 2 d relative. In bfloat16, q and k carry 8
# significant bits (eps / 2 relative each), and the layers below round their
# outputs at other points in the engine than in torch, so a logit l is known
# to about |l| eps; the logits that carry probability near a cut are a few
# units here, hence SCORE_RTOL = 8 eps relative. SCORE_ATOL = eps: a
# probability near 1 is itself known only to eps, and the floor keeps small
# scores (recent keys seen by a query or two) from needing an ever tighter
# relative match. Two scores are within rounding of each other when their gap
# is under the sum of both tolerances (each may be off the other way).
# Measured on these models (engine against reference, every kept key at every
# cut): the worst score gap is 0.2 of its tolerance (llama-head-64; 1e-5 with
# the torch attention of llama), and about 6% of cuts have competing scores
# within rounding, where the check below accepts either choice.
BF16_EPS = torch.finfo(torch.bfloat16).eps  # 2**-7
SCORE_RTOL = 8 * BF16_EPS
SCORE_ATOL = BF16_EPS
# At least this share of (cut, layer, kv-head) must be decided (no near-tie
# at the cut), or the check could pass whatever the engine picked.
MIN_DECIDED = 0.8


def score_tolerance(score: float) -> float:
    return SCORE_RTOL * abs(score) + SCORE_ATOL


def within_rounding(a: float, b: float) -> bool:
    """Both finite and closer than bfloat16 rounding can move them apart."""
    if not (math.isfinite(a) and math.isfinite(b)):
        return False
    return abs(a - b) <= score_tolerance(a) + score_tolerance(b)


def wrong_choices(priority: dict[int, float], kept: set[int]) -> list[tuple[int, int]]:
    """(kept a, evicted b) pairs where b should have stayed rather than a: a
    higher keep-priority (score; +inf in the recent window) by more than
    rounding."""
    evicted = [b for b in priority if b not in kept]
    return [
        (a, b)
        for a in kept
        for b in evicted
        if priority[b] > priority[a] and not within_rounding(priority[a], priority[b])
    ]


def decided(priority: dict[int, float], kept: set[int]) -> bool:
    """No evicted key is within rounding of a kept one: one right answer."""
    evicted = [priority[b] for b in priority if b not in kept]
    return not any(within_rounding(priority[a], e) for a in kept for e in evicted)


# -- the engine's side ---------------------------------------------------------


@dataclass
class Recorded:
    """One request in the engine: its tokens, and after every cut, per
    (layer, kv-head), the positions and scores of the keys it kept."""

    prompt: list[int]
    params: SamplingParams
    tokens: list[int] = field(default_factory=list)
    cuts: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def run_recording(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> list:
    """Run the requests in one batch; after each step, read every running
    request's kept keys (its cache after the step's eviction) by length."""
    engine = llm.engine
    runs = [Recorded(p, sp) for p, sp in zip(prompts, params, strict=True)]
    for i, run in enumerate(runs):
        engine.add_request(str(i), run.prompt, run.params)
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                runs[int(out.request_id)].tokens = out.outputs[0].token_ids
        for req in engine.scheduler.running:
            length = req.num_computed_tokens
            if length < req.num_prompt_tokens:
                continue  # no cut before the prompt is in
            rid = req.request_id
            blocks, n = engine.kv.block_table(rid), engine.kv.num_slots(rid)
            scores, positions = engine.runner.cache.read_slot_state(blocks, n)
            runs[int(rid)].cuts[length] = (scores.clone(), positions.clone())
    assert engine.kv.num_used_blocks == 0
    return runs


# -- the reference's side ------------------------------------------------------


class CutChecker:
    """DenseReference.on_cut: the engine's kept keys at this cut against the
    reference's scores, then the reference adopts them."""

    def __init__(self, reference: DenseReference, run: Recorded) -> None:
        self.reference = reference
        self.run = run
        self.matched: list[int] = []
        self.unmatched: list[int] = []
        self.rows = self.decided = self.differ = 0

    def __call__(self, length: int) -> None:
        if length not in self.run.cuts:
            self.unmatched.append(length)
            return
        self.matched.append(length)
        scores, positions = self.run.cuts[length]
        for layer in range(positions.shape[0]):
            for head in range(positions.shape[1]):
                self._check(layer, head, length, scores[layer, head], positions[layer, head])

    def _check(self, layer, head, length, scores, positions) -> None:
        ref, where = self.reference, f"layer {layer}, kv-head {head}, at length {length}"
        kept = set(positions.tolist())
        assert len(kept) == positions.numel(), f"a key holds two slots ({where})"
        priority = ref.priorities(layer, head, length)
        assert kept <= set(priority), f"kept keys the reference had evicted ({where})"
        wrong = wrong_choices(priority, kept)
        assert not wrong, f"evicted the wrong keys ({where}): (kept, evicted) {wrong}, " + str(
            {j: round(priority[j], 5) for pair in wrong for j in pair}
        )
        for s, j in zip(scores.tolist(), positions.tolist(), strict=True):
            expected = ref.score(layer, head, j)
            assert abs(s - expected) <= score_tolerance(expected), (where, j, s, expected)
        self.rows += 1
        self.decided += decided(priority, kept)
        self.differ += kept != ref.kept(layer, head)
        ref.adopt(layer, head, kept)


def check_against_reference(llm: LLM, run: Recorded) -> CutChecker:
    settings = KVPolicySettings(kv_policy=run.params.kv_policy, **KV)
    reference = DenseReference(llm.engine.model, settings)
    checker = CutChecker(reference, run)
    reference.on_cut = checker
    reference.generate(run.prompt, run.params, follow=run.tokens)
    # Every cut the engine made was checked: the prompt's and each decode
    # step's but the last (the request finishes and leaves the cache then).
    n = len(run.prompt)
    assert checker.matched == list(range(n, n + MAX_TOKENS - 1))
    assert checker.unmatched == [n + MAX_TOKENS - 1]
    return checker


# -- the tests -----------------------------------------------------------------


@pytest.fixture(scope="module", params=FAMILIES)
def folder(request, tmp_path_factory):
    return build_tiny_model(request.param, tmp_path_factory.mktemp(request.param))


def _bf16_llm(folder) -> LLM:
    llm = LLM(
        model=str(folder), skip_tokenizer_init=True, dtype="bfloat16", block_size=4,
        kv_cache_blocks=256,
    )  # fmt: skip
    assert llm.engine.runner.cache.k.dtype == torch.bfloat16
    return llm


def _check_batch(llm: LLM) -> None:
    """h2o and keyformer, greedy and seeded, in one batch; every cut checked."""
    prompts = _prompts(4)
    params = [_params(POLICIES[i % 2], i) for i in range(len(prompts))]
    runs = run_recording(llm, prompts, params)
    checkers = [check_against_reference(llm, run) for run in runs]
    rows = sum(c.rows for c in checkers)
    assert rows > 0 and llm.engine.stats()["tokens_evicted"] > 0
    assert sum(c.decided for c in checkers) >= MIN_DECIDED * rows


def test_bf16_eviction_keeps_the_dense_references_keys(folder):
    _check_batch(_bf16_llm(folder))


def test_bf16_torch_victim_choice_keeps_the_dense_references_keys(folder, monkeypatch):
    # The torch selection (GPUs, or no C++ kernels) reads the same float32 scores.
    monkeypatch.setattr("engine.runtime.eviction.lowest_priority_slots", lambda: None)
    _check_batch(_bf16_llm(folder))


def test_ties_and_wrong_choices():
    # 1.0 and 1.05 are within rounding (gap 0.05 < 2 * (8 eps + eps)); 1.0 and 2.0 are not.
    assert within_rounding(1.0, 1.05) and not within_rounding(1.0, 2.0)
    assert not within_rounding(1.0, math.inf)
    priority = {0: 2.0, 1: 1.0, 2: 1.05, 3: math.inf}
    assert wrong_choices(priority, {0, 2, 3}) == []
    assert wrong_choices(priority, {0, 1, 3}) == []  # 1.0 kept over 1.05: a near-tie
    assert wrong_choices(priority, {1, 2, 3}) == [(1, 0), (2, 0)]
    assert wrong_choices(priority, {0, 1, 2}) == [(0, 3), (1, 3), (2, 3)]  # a recent key
    assert decided(priority, {0, 3}) and not decided(priority, {0, 2, 3})
