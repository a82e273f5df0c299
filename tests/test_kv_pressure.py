"""Squeeze before preempting, at the scheduler: no model, a fake squeezer
whose "retained score" is a weight per slot, and the post-step eviction
played by the test (each sequence cut back to its budget after its step)."""

import pytest

from kv_manager import KVCacheManager
from kv_manager.manager import blocks_for
from kv_manager.policies import KVPolicySettings, SequencePolicy
from scheduler import Request, RequestStatus, Scheduler, SchedulerConfig, SlotCut
from scheduler.pressure import squeeze_capacity, squeeze_floor, squeeze_target

BLOCK = 4


def kv_request(
    rid: str,
    prompt_len: int = 16,
    max_tokens: int = 6,
    policy: str = "h2o",
    pressure: str = "squeeze",
    min_tokens: int = 8,
    ratio: float = 1.0,
    squeeze_min_ratio: float = 0.0,
) -> Request:
    # kv_ratio 1: the budget is the prompt, so a decode at a block boundary
    # needs one block more than the prompt did.
    settings = KVPolicySettings(
        kv_policy=policy,
        kv_ratio=ratio,
        kv_min_tokens=min_tokens,
        kv_pressure=pressure,
        kv_squeeze_min_ratio=squeeze_min_ratio,
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
    def __init__(
        self, num_blocks: int, weights: dict[str, float] | None = None, chunk: int = 256
    ) -> None:
        self.kv = KVCacheManager(num_blocks, BLOCK)
        self.squeezer = FakeSqueezer(self.kv, weights or {})
        self.sched = Scheduler(SchedulerConfig(64, chunk), self.kv, squeezer=self.squeezer)
        self.preempted: list[str] = []
        self.peak_running = 0

    def add(self, *requests: Request) -> None:
        for r in requests:
            self.sched.add_request(r)

    def step(self) -> None:
        out = self.sched.schedule()
        self.preempted += [r.request_id for r in out.preempted]
        self.peak_running = max(self.peak_running, len(self.sched.running))
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


def running_ids(sim: PressureSim) -> list[str]:
    return [r.request_id for r in sim.sched.running]


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
            assert r.slot_budget >= r.kv.settings.kv_squeeze_min_ratio * r.kv.budget


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


def test_a_squeeze_stops_at_its_share_of_the_budget_asked():
    # Budget 16: a share of 0.75 is a floor of 12, above kv_min_tokens 8.
    r = kv_request("a", min_tokens=8, squeeze_min_ratio=0.75)
    assert squeeze_floor(r) == 12
    assert squeeze_target(r, 16, 1, BLOCK) == 15
    assert squeeze_target(r, 15, 1, BLOCK) is None  # 11 would be under 12
    # The larger of the two floors holds; a share is rounded up, but not past
    # an exact product (0.55 * 100 is 55.00000000000001 in floats).
    assert squeeze_floor(kv_request("b", min_tokens=13, squeeze_min_ratio=0.75)) == 13
    hundred = {"prompt_len": 100, "min_tokens": 0}
    assert squeeze_floor(kv_request("c", squeeze_min_ratio=0.55, **hundred)) == 55
    assert squeeze_floor(kv_request("d", squeeze_min_ratio=0.551, **hundred)) == 56
    assert squeeze_floor(kv_request("e", min_tokens=0)) == 1  # never to 0


@pytest.mark.parametrize("floor, share", [(0, 0.0), (3, 0.0), (8, 0.0), (13, 0.0), (0, 0.5)])
def test_the_capacity_counts_the_steps_squeeze_target_takes(floor, share):
    r = kv_request("a", min_tokens=floor, squeeze_min_ratio=share)
    for slots in range(1, 30):
        for new_tokens in (0, 1, 5):
            steps, budget = 0, slots
            while (budget := squeeze_target(r, budget, new_tokens, BLOCK)) is not None:
                steps += 1
            assert squeeze_capacity(r, slots, new_tokens, BLOCK) == steps, (slots, new_tokens)


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


def test_squeezing_stops_at_its_share_of_the_budget_and_then_preempts():
    # The same three as above with kv_min_tokens 0: a share of 0.95 (a floor
    # of 16) leaves nothing to squeeze; 0.9 (15) allows one step each.
    sim = PressureSim(12)
    sim.add(*(kv_request(r, min_tokens=0, squeeze_min_ratio=0.95) for r in "abc"))
    sim.step()
    sim.step()
    assert sim.squeezer.cuts == [] and sim.preempted == ["c"]
    sim = PressureSim(12)
    requests = [kv_request(r, min_tokens=0, squeeze_min_ratio=0.9) for r in "abc"]
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


def test_a_waiting_request_is_squeezed_in_beside_the_running_sets_own_squeezes():
    sim = PressureSim(12)
    sim.add(*(kv_request(r) for r in "abc"))
    sim.step()
    sim.add(kv_request("d", prompt_len=4))
    # The decodes are three blocks short and d needs one: four steps (a, b,
    # c can each give two), every sequence cut once, and d admitted.
    sim.step()
    assert sorted(b - budget for _, b, budget in sim.squeezer.cuts) == [1, 1, 5]
    assert sim.sched.num_squeezes == 3 and not sim.sched.waiting
    assert "d" in running_ids(sim)
    sim.run()
    assert sim.preempted == []


def test_the_running_sets_squeezes_alone_when_the_head_cannot_be_covered():
    sim = PressureSim(12)
    sim.add(*(kv_request(r) for r in "abc"))
    sim.step()
    sim.add(kv_request("d", prompt_len=16))  # four blocks; only three more to squeeze
    sim.step()
    assert sorted(b - budget for _, b, budget in sim.squeezer.cuts) == [1, 1, 1]
    assert [r.request_id for r in sim.sched.waiting] == ["d"]
    sim.run()


def half(rid: str, prompt_len: int = 16, **kw) -> Request:
    """kv_ratio 0.5 and a floor of 4: admitted on its whole prompt, then held
    at half of it, so admission, not the decodes, is what a pool runs out of."""
    return kv_request(rid, prompt_len, ratio=0.5, min_tokens=4, **kw)


def test_squeezing_admits_the_head_of_the_queue_when_it_frees_enough():
    # Three prompts of 16 fill the 12 blocks, then hold 8 slots (2 blocks)
    # each; their decodes take 9 (3 blocks), leaving 3 free for d's 4.
    sim = PressureSim(12, weights={"a": 1.0, "b": 0.2, "c": 0.5})
    sim.add(half("a"), half("b"), half("c"))
    sim.step()
    sim.add(half("d"), half("e"))
    sim.step()
    # One block short: b, the cheapest, is cut from 8 slots to 7 (7 + its
    # decode fit in 2 blocks); e would need four more, and a and c have one
    # each: nothing is squeezed for it.
    assert sim.squeezer.cuts == [("b", 8, 7)]
    assert running_ids(sim) == ["a", "b", "c", "d"] and running_ids(sim)[-1] == "d"
    assert [r.request_id for r in sim.sched.waiting] == ["e"]
    b = sim.sched.requests["b"]
    assert b.squeezes == [(16, 7)] and b.slot_budget == 7
    assert sim.sched.num_squeezes == 1 and sim.sched.num_tokens_evicted_by_squeeze == 1
    sim.run()
    assert sim.preempted == []


def test_nothing_is_squeezed_when_squeezing_cannot_admit_the_head():
    sim = PressureSim(12)
    sim.add(half("a"), half("b"), half("c"))
    sim.step()
    # d's 32-token prompt needs 8 blocks; 3 are free and 3 could be
    # squeezed. e, small as it is, waits behind it (FCFS).
    sim.add(half("d", prompt_len=32), half("e", prompt_len=4))
    sim.step()
    assert sim.squeezer.cuts == [] and sim.sched.num_squeezes == 0
    assert [r.request_id for r in sim.sched.waiting] == ["d", "e"]
    sim.run()
    assert sim.sched.num_squeezes == 0 and sim.preempted == []


def test_only_running_sequences_that_say_squeeze_are_squeezed_to_admit():
    # Whatever the waiting request asked: here `preempt` and `full`.
    sim = PressureSim(12, weights={"full": 0.0, "keep": 0.0, "give": 9.0})
    full = half("full", policy="full")
    keep = half("keep", pressure="preempt")
    give = half("give")
    sim.add(full, keep, give)
    sim.step()  # full holds 4 blocks, keep and give 2 each after their cuts
    sim.add(half("d", pressure="preempt", prompt_len=4), half("e", policy="full", prompt_len=4))
    sim.step()
    # full's decode needs a fifth block, keep's and give's a third: 3 of 4
    # free are left, d takes 1, e needs 1 more: give has one to give.
    assert sim.squeezer.cuts == [("give", 8, 7)]
    assert running_ids(sim)[-2:] == ["d", "e"]
    sim.run()
    assert full.squeezes == [] and keep.squeezes == []


def test_a_sequence_still_prefilling_is_not_squeezed_to_admit():
    # Chunks of 8 tokens. c (8 tokens, budget 8, floor 2) decodes; a's
    # 32-token prompt, admitted on its budget 16 + one chunk, is mid-prompt
    # and the cheapest to squeeze, but only c, past its prompt, may be.
    sim = PressureSim(9, weights={"a": 0.0, "c": 1.0}, chunk=8)
    c = kv_request("c", 8, min_tokens=2)
    a = half("a", prompt_len=32)
    sim.add(c)
    sim.step()
    sim.add(a)
    sim.step()
    assert running_ids(sim) == ["c", "a"] and a.num_computed_tokens == 7
    # d is admitted on 18 slots (5 blocks); 4 are free after the decodes.
    sim.add(half("d", prompt_len=20))
    sim.step()
    assert sim.squeezer.cuts == [("c", 8, 7)] and a.squeezes == []
    assert running_ids(sim) == ["c", "a", "d"] and a.num_computed_tokens < 32
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


def test_a_burst_runs_more_at_once_under_squeeze_with_full_requests_untouched():
    # Twelve at once into 24 blocks: each is admitted on its whole prompt and
    # then holds half of it, so under preempt the queue waits on admission.
    peak, squeezed = {}, {}
    for pressure in ("preempt", "squeeze"):
        sim = PressureSim(24)
        requests = [
            half(f"r{i}", 16 + 4 * (i % 3), max_tokens=8 + i % 5,
                 policy=("h2o", "window", "full")[i % 3], pressure=pressure)
            for i in range(12)
        ]  # fmt: skip
        sim.add(*requests)
        sim.run()  # every step checks the blocks; the pool is whole at the end
        assert sim.preempted == []
        peak[pressure] = sim.peak_running
        squeezed[pressure] = {r.kv.settings.kv_policy for r in requests if r.squeezes}
        assert all(len(r.output_token_ids) == r.max_tokens for r in requests)
    assert peak == {"preempt": 5, "squeeze": 7}
    assert squeezed == {"preempt": set(), "squeeze": {"h2o", "window"}}
