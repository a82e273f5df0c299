"""Squeeze before preempting, through the engine with a tiny random llama:
squeezed outputs equal the dense reference run with the same budget
schedule, a burst that preempts under `preempt` does not under `squeeze`,
`full` requests are untouched, and the pool is whole after every scenario."""

import pytest
import torch
from dense_reference import DenseReference
from test_eviction_parity import InvariantChecker
from tiny_models import build_tiny_model

from engine import LLM, SamplingParams
from kv_manager.policies import KVPolicySettings

# kv_ratio 1: the budget is the prompt, so with prompts a multiple of the
# block size every decode needs a block more than the prompt took: a full
# pool runs short at once. kv_min_tokens 4 leaves room to squeeze.
KV = dict(kv_ratio=1.0, kv_min_tokens=4, recent_ratio=0.3, sink_tokens=2)
BLOCK = 4
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_model("llama", tmp_path_factory.mktemp("llama"))


def _llm(folder, num_blocks: int) -> LLM:
    return LLM(
        model=str(folder), skip_tokenizer_init=True, dtype="float32", block_size=BLOCK,
        kv_cache_blocks=num_blocks, max_num_batched_tokens=128,
    )  # fmt: skip


def _prompts(lengths: list[int]) -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(3, 250, (n,), generator=g).tolist() for n in lengths]


def _params(policy: str, i: int, pressure: str, kv: dict = KV) -> SamplingParams:
    return SamplingParams(
        temperature=0.0 if i % 2 == 0 else 0.8, seed=40 + i, max_tokens=MAX_TOKENS,
        ignore_eos=True, kv_policy=policy, kv_pressure=pressure, **kv,
    )  # fmt: skip


# A full request (it grows every step) beside four evicting ones: a pool of
# 22 blocks takes the five prompts (4 + 4 + 5 + 6 + 3 blocks) and nothing more.
POLICIES = ["full", "h2o", "keyformer", "window", "streaming"]
LENGTHS = [16, 16, 20, 24, 12]
POOL = 22


def _run(llm: LLM, prompts, params):
    """Every request to the end, the cache invariants checked after each step;
    returns {id: tokens}, {id: the scheduler's Request} and the checker."""
    engine = llm.engine
    checker = InvariantChecker(llm)
    requests, results = {}, {}
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        engine.add_request(str(i), p, sp)
        requests[str(i)] = engine.scheduler.requests[str(i)]
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out
        checker.check()
    assert engine.kv.num_used_blocks == 0
    assert engine.kv.pool.num_free == engine.kv.num_total_blocks
    return results, requests


# Score-based only: the post-step cuts take the C++ victim choice (a batch of
# h2o/keyformer sequences); with window and streaming in it, the torch one.
MIXES = {"all": POLICIES, "scored": ["full", "h2o", "keyformer", "keyformer", "h2o"]}


@pytest.mark.parametrize("mix", MIXES)
def test_squeezed_outputs_equal_the_dense_reference_with_their_budget_schedule(folder, mix):
    llm = _llm(folder, POOL)
    prompts = _prompts(LENGTHS)
    policies = MIXES[mix]
    params = [_params(p, i, "squeeze") for i, p in enumerate(policies)]
    results, requests = _run(llm, prompts, params)
    stats = llm.engine.stats()
    assert stats["preemptions"] == 0 and stats["squeezes"] >= 4, stats
    assert stats["tokens_evicted_by_squeeze"] > 0
    squeezed = [r for r in requests.values() if r.squeezes]
    assert {r.kv.settings.kv_policy for r in squeezed} == set(policies[1:])
    # The full request grows through the run, so squeezes come at more than one step.
    assert len({length for r in squeezed for length, _ in r.squeezes}) > 1
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        request = requests[str(i)]
        settings = KVPolicySettings(kv_policy=p.kv_policy, **KV)
        reference = DenseReference(llm.engine.model, settings)
        want = reference.generate(prompt, p, budgets=dict(request.squeezes))
        assert results[str(i)].outputs[0].token_ids == want, p.kv_policy
        usage = results[str(i)].kv
        assert usage.squeezed_budget == (request.slot_budget if request.squeezes else None)
        assert usage.num_squeezes == len(request.squeezes)
        for _, budget in request.squeezes:
            assert budget >= KV["kv_min_tokens"]


def test_a_burst_preempts_under_preempt_and_squeezes_under_squeeze(folder):
    prompts = _prompts(LENGTHS)
    outcome = {}
    for pressure in ("preempt", "squeeze"):
        llm = _llm(folder, POOL)
        params = [_params(p, i, pressure) for i, p in enumerate(POLICIES)]
        results, requests = _run(llm, prompts, params)
        outcome[pressure] = llm.engine.stats(), results
    preempt, squeeze = outcome["preempt"][0], outcome["squeeze"][0]
    assert preempt["preemptions"] > 0 and preempt["squeezes"] == 0, preempt
    assert squeeze["preemptions"] == 0 and squeeze["squeezes"] > 0, squeeze
    # The full request is never squeezed: its tokens are the same either way,
    # and its usage says so.
    for pressure in ("preempt", "squeeze"):
        full = outcome[pressure][1]["0"]
        assert full.kv.policy == "full" and full.kv.budget is None
        assert full.kv.squeezed_budget is None and full.kv.num_squeezes == 0
    assert outcome["preempt"][1]["0"].outputs[0].token_ids == (
        outcome["squeeze"][1]["0"].outputs[0].token_ids
    )


def test_requests_that_say_preempt_are_not_squeezed_beside_ones_that_say_squeeze(folder):
    llm = _llm(folder, POOL)
    prompts = _prompts(LENGTHS)
    pressures = ["squeeze", "preempt", "squeeze", "preempt", "squeeze"]
    params = [_params(p, i, pressures[i]) for i, p in enumerate(POLICIES)]
    results, requests = _run(llm, prompts, params)
    for i, pressure in enumerate(pressures):
        if pressure == "preempt" or i == 0:
            assert requests[str(i)].squeezes == [], i
    assert llm.engine.stats()["squeezes"] > 0


# Squeezing to admit: at kv_ratio 0.5 a sequence is admitted on its whole
# prompt, then holds half of it, so a burst waits on admission, not on its
# decodes. Eight requests in 20 blocks: five run at once under preempt.
HALF = dict(KV, kv_ratio=0.5)
BURST = ["full", "h2o", "keyformer", "window", "streaming", "h2o", "keyformer", "h2o"]
BURST_LENGTHS = [16, 16, 20, 24, 12, 16, 20, 16]


def _burst(folder, pressure: str, kv: dict = HALF):
    """Runs the burst; returns the engine, its outputs, its Requests and the
    ids of sequences squeezed in a step that admitted a waiting request."""
    llm = _llm(folder, 20)
    engine = llm.engine
    checker = InvariantChecker(llm)
    requests, results, squeezed_to_admit = {}, {}, set()
    for i, (prompt, policy) in enumerate(zip(_prompts(BURST_LENGTHS), BURST, strict=True)):
        params = _params(policy, i, pressure, kv)
        engine.add_request(str(i), prompt, params)
        requests[str(i)] = (engine.scheduler.requests[str(i)], prompt, params)
    while engine.has_unfinished_requests():
        waiting = {r.request_id for r in engine.scheduler.waiting}
        cuts = {i: len(r.squeezes) for i, (r, _, _) in requests.items()}
        for out in engine.step():
            results[out.request_id] = out if out.finished else results.get(out.request_id)
        admitted = waiting - {r.request_id for r in engine.scheduler.waiting}
        if admitted:
            squeezed = {i for i, (r, _, _) in requests.items() if len(r.squeezes) > cuts[i]}
            squeezed_to_admit |= squeezed
        checker.check()
    assert engine.kv.num_used_blocks == 0
    assert engine.kv.pool.num_free == engine.kv.num_total_blocks
    return engine, results, requests, squeezed_to_admit


def test_squeezing_to_admit_runs_more_at_once_and_keeps_the_dense_reference(folder):
    preempt, _, _, none = _burst(folder, "preempt")
    engine, results, requests, squeezed_to_admit = _burst(folder, "squeeze")
    before, after = preempt.stats(), engine.stats()
    assert before["squeezes"] == 0 and not none
    assert after["peak_running"] > before["peak_running"], (before, after)
    assert after["preemptions"] == 0 and after["squeezes"] > 0
    assert squeezed_to_admit and "0" not in squeezed_to_admit  # full never is
    for i, (request, prompt, params) in requests.items():
        settings = KVPolicySettings(kv_policy=params.kv_policy, **HALF)
        reference = DenseReference(engine.model, settings)
        want = reference.generate(prompt, params, budgets=dict(request.squeezes))
        assert results[i].outputs[0].token_ids == want, params.kv_policy
        usage = results[i].kv
        assert usage.num_squeezes == len(request.squeezes)
        assert usage.squeezed_budget == (request.slot_budget if request.squeezes else None)
        assert all(budget >= HALF["kv_min_tokens"] for _, budget in request.squeezes)


def test_a_squeeze_keeps_its_share_of_the_budget_asked(folder):
    # Budgets of 6-12 tokens; a share of 0.75 leaves each at most one block
    # to give, where kv_min_tokens 4 alone lets most give two.
    free, _, free_requests, _ = _burst(folder, "squeeze")
    floored = dict(HALF, kv_squeeze_min_ratio=0.75)
    engine, results, requests, _ = _burst(folder, "squeeze", floored)
    assert engine.stats()["squeezes"] > 0
    lowest = {}
    for i, (request, _, _) in requests.items():
        for _, budget in request.squeezes:
            assert budget >= 0.75 * request.kv.budget, (i, budget, request.kv.budget)
        lowest[i] = request.slot_budget
    free_lowest = {i: r.slot_budget for i, (r, _, _) in free_requests.items()}
    assert any(lowest[i] > free_lowest[i] for i in lowest if lowest[i] is not None)
    assert engine.stats()["peak_running"] <= free.stats()["peak_running"]
    assert all(results[i].finished for i in requests)
