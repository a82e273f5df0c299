"""A budget chosen from a quality target (issue 23, kv_target_mass): at the end
of its prompt a sequence keeps the fewest keys that hold the target share of
the score in every (layer, KV head); the choice equals the dense reference's
on the same scores, the cache is cut to it at once, admission goes by what
the choice could give at most, and the pool is whole after."""

import pytest
import torch
from dense_reference import DenseReference, mass_keys
from tiny_models import build_tiny_model

import engine.runtime.llm_engine as llm_engine
from engine import LLM, SamplingParams
from kv_manager.manager import blocks_for
from kv_manager.policies import KVPolicySettings, SequencePolicy, keys_for_mass, make_policy
from scheduler import Request

KV = dict(kv_min_tokens=0, recent_ratio=0.25)
BLOCK = 4


# -- the settings --------------------------------------------------------------


def test_the_budget_waits_for_the_prompt_at_the_most_it_could_be():
    s = KVPolicySettings(kv_policy="h2o", kv_target_mass=0.9, kv_min_tokens=0)
    assert s.chooses_budget and s.budget(100) == 100  # every prompt key, until chosen
    assert KVPolicySettings(kv_policy="h2o", kv_target_mass=0.9, kv_max_tokens=30).budget(100) == 30
    assert KVPolicySettings(kv_policy="h2o", kv_target_mass=0.9).budget(100) == 128  # the floor
    assert s.clamp_budget(0) == 1 and s.clamp_budget(7) == 7
    full = KVPolicySettings(kv_policy="full", kv_target_mass=0.9)
    assert not full.chooses_budget and full.budget(100) is None  # full ignores it


@pytest.mark.parametrize("policy", ["window", "streaming"])
def test_a_target_needs_a_policy_with_scores(policy):
    with pytest.raises(ValueError, match=r"^kv_target_mass needs a policy that scores keys"):
        KVPolicySettings(kv_policy=policy, kv_target_mass=0.9)
    with pytest.raises(ValueError, match=r"^kv_target_mass needs a policy that scores keys"):
        SamplingParams(kv_policy=policy, kv_target_mass=0.9)
    # A server default target gives way to a request's policy without scores.
    default = KVPolicySettings(kv_target_mass=0.9)
    assert default.with_overrides(kv_policy=policy).kv_target_mass is None
    with pytest.raises(ValueError, match=r"^kv_target_mass needs"):
        default.with_overrides(kv_policy=policy, kv_target_mass=0.8)


@pytest.mark.parametrize("value", [0.0, -0.5, 1.5, float("nan"), "most"])
def test_a_target_outside_0_1_is_refused(value):
    with pytest.raises(ValueError, match=r"^kv_target_mass must be"):
        SamplingParams(kv_target_mass=value)


def test_one_budget_rule_per_request():
    with pytest.raises(ValueError, match=r"^kv_target_mass and kv_ratio both set the budget"):
        SamplingParams(kv_ratio=0.5, kv_target_mass=0.9)
    default = KVPolicySettings(kv_target_mass=0.9)
    assert default.with_overrides(kv_ratio=0.3).kv_target_mass is None  # the request's rule
    assert default.with_overrides(kv_policy="h2o").kv_target_mass == 0.9
    mass = KVPolicySettings().with_overrides(kv_target_mass=0.8)
    assert mass.chooses_budget and mass.kv_ratio == 0.5


def test_a_chosen_budget_below_a_squeeze_wins():
    settings = KVPolicySettings(kv_policy="h2o", kv_target_mass=0.9, kv_min_tokens=0)
    kv = SequencePolicy.resolve(settings, 60, seed=1)
    assert kv.budget_pending and kv.budget == 60
    request = Request("r", list(range(60)), 4, kv=kv)
    request.squeezes.append((32, 25))
    request.kv = kv.with_budget(20)
    assert request.slot_budget == 20 and not request.kv.budget_pending
    request.kv = kv.with_budget(30)
    assert request.slot_budget == 25


# -- the rule, on the same scores ----------------------------------------------


def _dense_budget(scores, positions, length, settings) -> int:
    """The dense reference's rule per (layer, kv-head), then the largest."""
    L, H, _ = scores.shape
    keys = [
        mass_keys(dict(zip(positions[l, h].tolist(), scores[l, h].tolist(), strict=True)),
                  length, settings)
        for l in range(L) for h in range(H)
    ]  # fmt: skip
    return max(keys)


@pytest.mark.parametrize("policy", ["h2o", "keyformer"])
def test_keys_for_mass_is_the_dense_rule_on_the_same_scores(policy):
    g = torch.Generator().manual_seed(4)
    L, H, S, length = 3, 2, 40, 64
    chosen = []
    for target in (0.3, 0.7, 0.9, 0.95, 0.99, 1.0):
        settings = KVPolicySettings(kv_policy=policy, kv_target_mass=target, **KV)
        for _ in range(4):
            # A sparse held set in any slot order, as after earlier cuts; skewed scores.
            positions = torch.stack(
                [torch.randperm(length, generator=g)[:S] for _ in range(L * H)]
            ).view(L, H, S)
            scores = torch.rand(L, H, S, generator=g) ** 4 * 3
            got = keys_for_mass(make_policy(settings), scores, positions, length, target)
            assert got == _dense_budget(scores, positions, length, settings), target
            chosen.append((target, got))
    # The targets spread the choices, and a higher target never keeps fewer keys.
    assert len({k for _, k in chosen}) > 4 and max(k for t, k in chosen if t == 1.0) == S
    assert min(k for t, k in chosen if t == 0.3) < 20


# -- the engine against the dense reference ------------------------------------


@pytest.fixture(scope="module", params=["llama", "llama-head-64"])
def small(request, tmp_path_factory):
    return build_tiny_model(request.param, tmp_path_factory.mktemp(request.param))


def _prompt(n: int, seed: int = 7) -> list[int]:
    return torch.randint(3, 250, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _llm(folder, chunk: int, blocks: int = 64) -> LLM:
    return LLM(
        model=str(folder), skip_tokenizer_init=True, dtype="float32", block_size=BLOCK,
        kv_cache_blocks=blocks, max_num_batched_tokens=chunk,
    )  # fmt: skip


def _params(policy: str, target: float, **extra) -> SamplingParams:
    fields = dict(temperature=0.0, seed=5, max_tokens=6, ignore_eos=True, **KV)
    return SamplingParams(kv_policy=policy, kv_target_mass=target, **{**fields, **extra})


@pytest.fixture
def choices(monkeypatch):
    """Each request's scores, positions and length where its budget was chosen."""
    seen = {}
    real = llm_engine.choose_budgets

    def record(cache, kv, requests):
        for r in requests:
            rid = r.request_id
            if r.kv.budget_pending and r.num_computed_tokens >= r.num_prompt_tokens:
                state = cache.read_slot_state(kv.block_table(rid), kv.num_slots(rid))
                seen[rid] = (*(t.clone() for t in state), r.num_computed_tokens)
        real(cache, kv, requests)

    monkeypatch.setattr(llm_engine, "choose_budgets", record)
    return seen


def _run(llm: LLM, prompt: list[int], params: SamplingParams) -> tuple[list[int], int, list]:
    """Tokens, the budget chosen, and (slots, blocks) after every step."""
    engine, after = llm.engine, []
    engine.add_request("0", prompt, params)
    tokens = budget = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            budget = out.kv.budget
            assert out.kv.target_mass == params.kv_target_mass
            if out.finished:
                tokens = out.outputs[0].token_ids
        if engine.has_unfinished_requests():
            after.append((engine.kv.num_slots("0"), len(engine.kv.block_table("0"))))
    assert engine.kv.num_used_blocks == 0
    assert engine.kv.pool.num_free == engine.kv.num_total_blocks  # the pool is whole
    return tokens, budget, after


@pytest.mark.parametrize("policy", ["h2o", "keyformer"])
@pytest.mark.parametrize("target", [0.6, 0.9])
def test_the_engine_chooses_the_dense_references_budget(small, choices, policy, target):
    llm = _llm(small, chunk=64)  # the prompt in one chunk: one cut, after it
    prompt, params = _prompt(40), _params(policy, target)
    tokens, budget, after = _run(llm, prompt, params)
    settings = KVPolicySettings(kv_policy=policy, kv_target_mass=target, **KV)
    scores, positions, length = choices["0"]
    assert positions.shape[-1] == length == 40  # weighed over every prompt key
    assert budget == settings.clamp_budget(_dense_budget(scores, positions, length, settings))
    assert 1 <= budget < 40
    # Cut to it at once, and held there: slots and blocks after every step.
    assert after == [(budget, blocks_for(budget, BLOCK))] * len(after)
    reference = DenseReference(llm.engine.model, settings)
    assert reference.generate(prompt, params) == tokens
    assert reference.budget == budget


@pytest.mark.parametrize("policy", ["h2o", "keyformer"])
def test_a_capped_prompt_is_compressed_while_it_prefills_then_chosen(small, choices, policy):
    """kv_max_tokens 30 under a 70-token prompt in chunks of 16: cut to 30 at
    32, 48 and 64, then weighed at 70 over the 36 keys held."""
    llm = _llm(small, chunk=16)
    prompt, params = _prompt(70), _params(policy, 0.9, kv_max_tokens=30)
    tokens, budget, after = _run(llm, prompt, params)
    assert [slots for slots, _ in after[:4]] == [16, 30, 30, 30]
    assert choices["0"][1].shape[-1] == 36 and budget <= 30
    assert after[4:] == [(budget, blocks_for(budget, BLOCK))] * len(after[4:])
    assert llm.engine.peak_kv_blocks_used <= blocks_for(30 + 16, BLOCK)
    settings = KVPolicySettings(kv_policy=policy, kv_target_mass=0.9, kv_max_tokens=30, **KV)
    reference = DenseReference(llm.engine.model, settings)
    assert reference.generate(prompt, params, chunk=16) == tokens
    assert reference.budget == budget


# -- admission and the pool ----------------------------------------------------


def test_admission_counts_the_whole_prompt_until_the_choice(small):
    """Without kv_max_tokens a prompt is held whole before its budget is
    chosen: one larger than the pool is refused; capped, it runs compressed."""
    llm = _llm(small, chunk=16, blocks=32)  # 128 tokens
    engine, prompt = llm.engine, _prompt(200)
    with pytest.raises(ValueError, match=r"^prompt \(200 tokens\) held whole until its budget"):
        engine.add_request("big", prompt, _params("h2o", 0.9))
    engine.add_request("big", prompt, _params("h2o", 0.9, kv_max_tokens=48))
    request = engine.scheduler.requests["big"]
    assert engine.scheduler._prefill_slots(request) == 48 + 16
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.kv.budget <= 48
        assert engine.kv.pool.num_free + engine.kv.num_blocks_held() == 32
    assert engine.peak_kv_blocks_used <= blocks_for(48 + 16, BLOCK)
    assert engine.kv.num_used_blocks == 0


def test_a_tight_pool_admits_on_the_prompt_then_on_the_choice(small):
    """Four 40-token prompts in a pool of 96 tokens: two are admitted on their
    whole prompts, the others once the choices have cut them; each gives the
    tokens and budget it gives alone."""
    prompts = [_prompt(40, seed=s) for s in range(4)]
    params = _params("h2o", 0.7, max_tokens=8)
    alone = [_llm(small, chunk=64).generate([p], params)[0] for p in prompts]
    llm = _llm(small, chunk=64, blocks=24)
    engine = llm.engine
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    engine.step()
    assert engine.scheduler.num_running == 2  # 10 + 10 blocks; a third would not fit
    outs = {}
    while engine.has_unfinished_requests():
        outs |= {o.request_id: o for o in engine.step() if o.finished}
    for i, solo in enumerate(alone):
        assert outs[str(i)].outputs[0].token_ids == solo.outputs[0].token_ids
        assert outs[str(i)].kv.budget == solo.kv.budget < 40
    assert engine.scheduler.num_preemptions == 0 and engine.kv.pool.num_free == 24


def test_preempted_after_the_choice_keeps_its_budget_and_leaks_nothing(small):
    """The floor (kv_min_tokens 40) over 30-token prompts: each grows to 40
    slots, more than the pool holds for both, so one is preempted; it is
    recomputed with its chosen budget, and every block comes back."""
    llm = _llm(small, chunk=64, blocks=16)  # 64 tokens
    engine = llm.engine
    params = SamplingParams(
        temperature=0.0, max_tokens=14, ignore_eos=True, kv_policy="keyformer", seed=2,
        kv_target_mass=0.8, kv_min_tokens=40, recent_ratio=0.25,
    )  # fmt: skip
    for i in range(2):
        engine.add_request(str(i), _prompt(30, seed=i), params)
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        assert engine.kv.pool.num_free + engine.kv.num_blocks_held() == 16
    assert engine.scheduler.num_preemptions > 0
    assert {o.kv.budget for o in finished.values()} == {40}
    assert all(len(o.outputs[0].token_ids) == 14 for o in finished.values())
    assert engine.kv.num_used_blocks == 0
