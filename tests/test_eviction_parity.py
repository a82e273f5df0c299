"""The paged, evicting engine against the dense reference, token for token,
with the cache's invariants checked after every step."""

import pytest
import torch
from dense_reference import DenseReference
from tiny_models import build_tiny_model

from engine import LLM, SamplingParams
from kv_manager.policies import KVPolicySettings

# llama-head-64 takes the C++ prompt kernels (head size 64), scored ones included.
FAMILIES = ["llama", "llama-head-64", "gpt2", "bloom"]
POLICIES = ["full", "window", "streaming", "h2o", "keyformer"]
KV = dict(kv_ratio=0.5, kv_min_tokens=0, recent_ratio=0.3, sink_tokens=2)
MAX_TOKENS = 14


@pytest.fixture(scope="module", params=FAMILIES)
def folder(request, tmp_path_factory):
    return build_tiny_model(request.param, tmp_path_factory.mktemp(request.param))


def _prompts(count: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    lengths = [22, 31, 40, 27, 35][:count]
    return [torch.randint(3, 250, (n,), generator=g).tolist() for n in lengths]


def _params(policy: str, i: int) -> SamplingParams:
    # Alternate greedy and seeded sampling; every request has a seed, which
    # also keys Keyformer's noise.
    temperature = 0.0 if i % 2 == 0 else 0.8
    return SamplingParams(
        temperature=temperature,
        seed=100 + i,
        max_tokens=MAX_TOKENS,
        ignore_eos=True,
        kv_policy=policy,
        **KV,
    )


def _reference(llm: LLM, prompt: list[int], params: SamplingParams) -> list[int]:
    settings = KVPolicySettings(kv_policy=params.kv_policy, **KV)
    # Prompts compress while they prefill, cut after every chunk.
    chunk = llm.engine.config.max_num_batched_tokens
    return DenseReference(llm.engine.model, settings).generate(prompt, params, chunk=chunk)


class InvariantChecker:
    """Checks the cache after every step: budgets, windows, no resurrection,
    pool accounting."""

    def __init__(self, llm: LLM) -> None:
        self.engine = llm.engine
        self.seen: dict[str, list[list[set[int]]]] = {}
        self.evicted_somewhere = False

    def check(self) -> None:
        engine = self.engine
        kv, cache = engine.kv, engine.runner.cache
        assert kv.pool.num_free + kv.num_blocks_held() == kv.num_total_blocks
        for req in engine.scheduler.running:
            rid, seq, budget = req.request_id, req.kv, req.slot_budget
            n_slots = kv.num_slots(rid)
            length = req.num_computed_tokens
            chunk = engine.config.max_num_batched_tokens
            if budget is not None and (length >= req.num_prompt_tokens or length % chunk == 0):
                # Exactly the budget (squeezed or not) in every layer and head
                # (one count for all), after the prompt and at its cut points.
                assert n_slots == min(length, budget)
                self.evicted_somewhere |= length > budget
            elif budget is not None:
                # Mid-prompt between cut points: at most one chunk past it.
                assert n_slots <= min(length, budget + chunk)
            elif req.num_preemptions == 0:
                assert n_slots == length
            _, positions = cache.read_slot_state(kv.block_table(rid), n_slots)
            self._check_positions(req, seq, positions.tolist(), length)

    def _check_positions(self, req, seq, positions, length) -> None:
        prev = self.seen.get(req.request_id)
        window, budget = 0, req.slot_budget
        if budget is not None and seq.settings.kv_policy in ("h2o", "keyformer", "snapkv"):
            window = seq.settings.recent_window(budget)
        if seq.settings.kv_policy == "window" and budget is not None:
            window = min(length, budget)
        now = []
        for layer, heads in enumerate(positions):
            row = []
            for head, slots in enumerate(heads):
                kept = set(slots)
                assert len(kept) == len(slots), "a token holds two slots"
                assert all(p < length for p in kept)
                if length >= req.num_prompt_tokens:
                    assert set(range(max(0, length - window), length)) <= kept
                if prev is not None:
                    old = prev[layer][head]
                    new_positions = set(range(max(old, default=-1) + 1, length))
                    assert kept <= old | new_positions, "an evicted token came back"
                row.append(kept)
            now.append(row)
        self.seen[req.request_id] = now


def _run_checked(llm: LLM, prompts, params) -> dict[str, list[int]]:
    checker = InvariantChecker(llm)
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        llm.engine.add_request(str(i), p, sp)
    results = {}
    while llm.engine.has_unfinished_requests():
        for out in llm.engine.step():
            if out.finished:
                results[out.request_id] = out.outputs[0].token_ids
        checker.check()
    assert llm.engine.kv.num_used_blocks == 0
    return results, checker


def check_mixed_policy_batch(llm: LLM) -> None:
    """One request per policy in one batch, each equal to the dense reference,
    with the cache invariants checked after every step."""
    prompts = _prompts(5)
    params = [_params(policy, i) for i, policy in enumerate(POLICIES)]
    results, checker = _run_checked(llm, prompts, params)
    assert checker.evicted_somewhere
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        assert results[str(i)] == _reference(llm, prompt, p), POLICIES[i]


def test_mixed_policy_batch_equals_dense_reference(folder):
    llm = LLM(
        dtype="float32",
        model=str(folder),
        skip_tokenizer_init=True,
        block_size=4,
        kv_cache_blocks=256,
        max_num_batched_tokens=24,
    )
    check_mixed_policy_batch(llm)
    stats = llm.engine.stats()
    assert stats["tokens_evicted"] > 0 and stats["blocks_freed_by_eviction"] > 0


def test_seeded_keyformer_is_reproducible_whatever_the_batch(folder):
    llm = LLM(
        model=str(folder),
        skip_tokenizer_init=True,
        block_size=4,
        kv_cache_blocks=256,
        dtype="float32",
    )
    prompts = _prompts(3)
    p = _params("keyformer", 1)
    alone = llm.generate([prompts[0]], p)[0].outputs[0].token_ids
    others = [_params(pol, 3) for pol in ("h2o", "full")]
    batch = llm.generate(prompts, [p, *others])
    assert batch[0].outputs[0].token_ids == alone
    other_seed = SamplingParams(**{**p.__dict__, "seed": 999})
    assert llm.generate([prompts[0]], other_seed)[0].outputs[0].token_ids != alone


def test_torch_victim_choice_equals_the_dense_reference(folder, monkeypatch):
    """The torch selection (GPUs, or no C++ kernels) for a batch of score-based
    sequences, in one pass, picks what the dense reference picks."""
    monkeypatch.setattr("engine.runtime.eviction.lowest_priority_slots", lambda: None)
    llm = LLM(
        model=str(folder), skip_tokenizer_init=True, dtype="float32", block_size=4,
        kv_cache_blocks=256, max_num_batched_tokens=24,
    )  # fmt: skip
    prompts = _prompts(4)
    params = [_params(p, i) for i, p in enumerate(["h2o", "keyformer", "keyformer", "h2o"])]
    results, checker = _run_checked(llm, prompts, params)
    assert checker.evicted_somewhere
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        assert results[str(i)] == _reference(llm, prompt, p), p.kv_policy
