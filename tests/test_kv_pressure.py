"""Squeeze before preempting, at the scheduler: no model, a fake squeezer
whose "retained score" is a weight per slot, and the post-step eviction
played by the test (each sequence cut back to its budget after its step)."""

import pytest

from kv_manager import KVCacheManager
from kv_manager.manager import blocks_for
from kv_manager.policies import KVPolicySettings, SequencePolicy
from scheduler import Request, RequestStatus, Scheduler, SchedulerConfig, SlotCut
from scheduler.pressure import squeeze_target

BLOCK = 4


def kv_request(
    rid: str,
    prompt_len: int = 16,
    max_tokens: int = 6,
    policy: str = "h2o",
    pressure: str = "squeeze",
    min_tokens: int = 8,
) -> Request:
    # kv_ratio 1: the budget is the prompt, so a decode at a block boundary
    # needs one block more than the prompt did.
    settings = KVPolicySettings(
        kv_policy=policy, kv_ratio=1.0, kv_min_tokens=min_tokens, kv_pressure=pressure
    )
    kv = SequencePolicy.resolve(settings, prompt_len, seed=0)
    return Request(rid, list(range(prompt_len)), max_tokens, kv=kv, arrival_time=0.0)


class FakeSqueezer:
    """Cutting a sequence loses `weight` per slot it drops."""

    def __init__(self, kv: KVCacheManager, weights: dict[str, float]) -> None:
        self.kv = kv
        self.weights = weights
        self.cuts: list[tuple[str, int, int]] = []  # (id, slots before, budget)

    def lost_score(self, request: Request, budget: int) -> float:
        slots = self.kv.num_slots(request.request_id)
        return self.weights.get(request.request_id, 1.0) * (slots - budget)

    def cut(self, request: Request, budget: int) -> SlotCut:
        self.cuts.append((request.request_id, self.kv.num_slots(request.request_id), budget))
        return SlotCut(request.request_id, budget)


class PressureSim:
    def __init__(self, num_blocks: int, weights: dict[str, float] | None = None) -> None:
        self.kv = KVCacheManager(num_blocks, BLOCK)
        self.squeezer = FakeSqueezer(self.kv, weights or {})
        self.sched = Scheduler(SchedulerConfig(64, 256), self.kv, squeezer=self.squeezer)
        self.preempted: list[str] = []

    def add(self, *requests: Request) -> None:
        for r in requests:
            self.sched.add_request(r)

    def step(self) -> None:
        out = self.sched.schedule()
        self.preempted += [r.request_id for r in out.preempted]
        sampled = {c.request_id: 7 for c in out.chunks if c.samples}
        for request in self.sched.update_from_output(out, sampled):
            if len(request.output_token_ids) >= request.max_tokens:
                self.sched.finish_request(request.request_id, RequestStatus.FINISHED_LENGTH)
        self._evict()
        check_pool(self.sched)

    def _evict(self) -> None:
        cuts = []
        for r in self.sched.running:
            budget = r.slot_budget
            past_prompt = r.num_computed_tokens >= r.num_prompt_tokens or r.num_preemptions
            if budget is not None and past_prompt and self.kv.num_slots(r.request_id) > budget:
                cuts.append(SlotCut(r.request_id, budget))
        self.sched.apply_evictions(cuts)

    def run(self, max_steps: int = 500) -> None:
        for _ in range(max_steps):
            if not self.sched.has_unfinished():
                break
            self.step()
        assert not self.sched.has_unfinished()
        assert self.kv.num_used_blocks == 0 and self.kv.num_free_blocks == self.kv.num_total_blocks


def check_pool(sched: Scheduler) -> None:
    """Blocks add up, and every running sequence holds exactly what its slots need."""
    kv = sched.kv
    assert kv.num_blocks_held() == kv.num_used_blocks
    assert kv.num_free_blocks + kv.num_used_blocks == kv.num_total_blocks
    for r in sched.running:
        assert len(kv.block_table(r.request_id)) == blocks_for(kv.num_slots(r.request_id), BLOCK)
        if r.squeezes:
            assert kv.num_slots(r.request_id) <= r.slot_budget
            assert r.slot_budget >= r.kv.settings.kv_min_tokens


def test_the_default_pressure_policy_is_preempt():
    assert KVPolicySettings().kv_pressure == "preempt"
    with pytest.raises(ValueError, match="kv_pressure must be one of"):
        KVPolicySettings(kv_pressure="shrink")


def test_a_squeeze_step_takes_one_block_off_the_peak():
    r = kv_request("a", min_tokens=8)
    assert squeeze_target(r, 16, 1, BLOCK) == 15  # 17 slots (5 blocks) -> 16 (4)
    assert squeeze_target(r, 15, 1, BLOCK) == 11
    assert squeeze_target(r, 16, 0, BLOCK) == 12  # not running this step: frees one now
    assert squeeze_target(r, 11, 1, BLOCK) is None  # 7 would be under kv_min_tokens 8
    assert squeeze_target(kv_request("b", min_tokens=0), 3, 1, BLOCK) is None  # never to 0


def test_a_full_pool_squeezes_the_cheapest_sequences_instead_of_preempting():
    # Three prompts of 16 fill 12 blocks; their first decodes need 3 more.
    sim = PressureSim(12, weights={"a": 1.0, "b": 0.1, "c": 0.5})
    a, b, c = kv_request("a"), kv_request("b"), kv_request("c")
    sim.add(a, b, c)
    sim.step()
    assert sim.kv.num_free_blocks == 0
    sim.step()
    # b's first step loses 0.1 and its second 0.4 more (cut to 11: 5 slots);
    # c's first 0.5, a's first 1.0: the three cheapest are b, b, c. Each
    # sequence is cut once, to the last budget chosen for it.
    assert sim.squeezer.cuts == [("b", 16, 11), ("c", 16, 15)]
    assert (a.squeezes, b.squeezes, c.squeezes) == ([], [(16, 11)], [(16, 15)])
    assert sim.sched.num_squeezes == 2
    assert sim.sched.num_tokens_evicted_by_squeeze == 6
    sim.run()
    assert sim.preempted == [] and sim.sched.num_preemptions == 0


def test_squeezing_stops_at_kv_min_tokens_and_then_preempts():
    # A floor at the budget leaves nothing to squeeze: the newest is preempted.
    sim = PressureSim(12)
    sim.add(*(kv_request(r, min_tokens=16) for r in "abc"))
    sim.step()
    sim.step()
    assert sim.squeezer.cuts == [] and sim.preempted == ["c"]
    # A floor of 15 allows one step each, which is just enough.
    sim = PressureSim(12)
    requests = [kv_request(r, min_tokens=15) for r in "abc"]
    sim.add(*requests)
    sim.run()
    assert sim.preempted == []
    assert [r.squeezes for r in requests] == [[(16, 15)]] * 3


def test_full_and_preempt_requests_are_never_squeezed():
    sim = PressureSim(12, weights={"full": 0.0, "keep": 0.0, "give": 9.0})
    full = kv_request("full", policy="full")
    keep = kv_request("keep", pressure="preempt")
    give = kv_request("give", min_tokens=4)
    sim.add(full, keep, give)
    sim.step()
    sim.step()
    # Only `give` may be squeezed, expensive as it is: three steps (16, 15,
    # 11, 7) cover the three blocks short, in one cut.
    assert sim.squeezer.cuts == [("give", 16, 7)] and sim.preempted == []
    sim.run()
    assert full.squeezes == [] and keep.squeezes == []
    assert full.kv.settings.kv_pressure == "squeeze"  # asked, but full never evicts


def test_squeezes_that_cannot_spare_a_preemption_are_not_made():
    # give can take two blocks off (16 -> 11, floor 8), but three are short:
    # the newest (give) is preempted, and nothing is squeezed for nothing.
    sim = PressureSim(12)
    sim.add(kv_request("a", pressure="preempt"), kv_request("b", pressure="preempt"))
    give = kv_request("give")
    sim.add(give)
    sim.step()
    sim.step()
    assert sim.squeezer.cuts == [] and sim.preempted == ["give"]
    assert give.squeezes == []
    sim.run()


def test_squeezed_sequences_do_not_let_new_requests_in_the_same_step():
    sim = PressureSim(12)
    sim.add(*(kv_request(r) for r in "abc"))
    sim.step()
    sim.add(kv_request("d", prompt_len=4))
    sim.step()  # squeezes made room for the running set; d would take it back
    assert sim.sched.num_squeezes > 0
    assert [r.request_id for r in sim.sched.waiting] == ["d"]
    sim.run()


@pytest.mark.parametrize("seed", range(4))
def test_a_burst_that_preempts_under_preempt_finishes_without_under_squeeze(seed):
    import random

    rng = random.Random(seed)
    shapes = [(rng.choice([12, 16, 20, 24]), rng.randint(4, 12)) for _ in range(10)]
    counts = {}
    for pressure in ("preempt", "squeeze"):
        sim = PressureSim(24)
        sim.add(
            *(
                kv_request(f"r{i}", n, m, policy=("h2o", "window")[i % 2], pressure=pressure)
                for i, (n, m) in enumerate(shapes)
            )
        )
        sim.run()
        counts[pressure] = (sim.sched.num_preemptions, sim.sched.num_squeezes)
    assert counts["preempt"][0] > 0 and counts["preempt"][1] == 0
    assert counts["squeeze"] == (0, counts["squeeze"][1]) and counts["squeeze"][1] > 0
