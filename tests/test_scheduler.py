"""Scheduler on CPU with no model: hand-built requests, hand-made sampled tokens.

Each step is `schedule()`, then a token from a fake model for every chunk that
samples, then `update_from_output`; the test plays the engine's part by
finishing a request once it has `max_tokens` outputs.
"""

import random
import zlib
from dataclasses import dataclass

import pytest

from kv_manager import KVCacheManager
from kv_manager.manager import blocks_for
from scheduler import (
    Request,
    RequestStatus,
    ScheduledChunk,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
    SlotCut,
)

BLOCK_SIZE = 4


def make_request(request_id: str, prompt_len: int, max_tokens: int = 8) -> Request:
    # Prompt tokens unique to the request, so a wrong recompute shows.
    base = 1000 * (zlib.crc32(request_id.encode()) % 997 + 1)
    return Request(request_id, list(range(base, base + prompt_len)), max_tokens, arrival_time=0.0)


def fake_next_token(cached: list[int]) -> int:
    """The fake model's next token: depends on every token in the sequence's cache."""
    return zlib.crc32(repr(cached).encode()) % 1_000_000


def expected_outputs(request: Request) -> list[int]:
    """What the fake model generates for the request when nothing gets in the way."""
    seq = list(request.prompt_token_ids)
    for _ in range(request.max_tokens):
        seq.append(fake_next_token(seq))
    return seq[request.num_prompt_tokens :]


def chunk_shape(chunk: ScheduledChunk) -> tuple[str, int, int, int, bool]:
    return (chunk.request_id, chunk.start, chunk.num_tokens, chunk.slot_start, chunk.samples)


@dataclass
class Step:
    """One step's schedule, with each chunk's shape as it was when scheduled.

    NOTE: `ScheduledChunk.samples` compares with the request's current length,
    so it only holds until `update_from_output` appends the new token; `shapes`
    keeps the values from before the update.
    """

    out: SchedulerOutput
    shapes: list[tuple[str, int, int, int, bool]]
    finished: list[Request]

    @property
    def ids(self) -> list[str]:
        return [c.request_id for c in self.out.chunks]

    @property
    def preempted_ids(self) -> list[str]:
        return [r.request_id for r in self.out.preempted]


class Sim:
    """A scheduler plus a fake model that plays the engine's part.

    The fake model keeps the tokens written to each sequence's KV slots and
    samples a token that depends on all of them, so a chunk that starts in the
    wrong place, a recompute that drops or repeats tokens, or a sample taken
    before the prompt is complete all change the outputs.
    """

    def __init__(
        self,
        num_blocks: int = 64,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        block_size: int = BLOCK_SIZE,
    ) -> None:
        self.kv = KVCacheManager(num_blocks, block_size)
        self.sched = Scheduler(SchedulerConfig(max_num_seqs, max_num_batched_tokens), self.kv)
        self.cache: dict[str, list[int]] = {}
        self.steps: list[Step] = []

    def add(self, request_id: str, prompt_len: int, max_tokens: int = 8) -> Request:
        request = make_request(request_id, prompt_len, max_tokens)
        self.sched.add_request(request)
        return request

    def abort(self, request_id: str) -> Request | None:
        self.cache.pop(request_id, None)
        return self.sched.abort_request(request_id)

    def step(self) -> Step:
        """Schedule, run the fake model, update, and finish requests at max_tokens."""
        out = self.sched.schedule()
        check_schedule(self.sched, out)
        shapes = [chunk_shape(c) for c in out.chunks]
        sampled = self._run_model(out)
        updated = self.sched.update_from_output(out, sampled)
        assert sorted(r.request_id for r in updated) == sorted(sampled)
        finished = []
        for request in updated:
            if len(request.output_token_ids) >= request.max_tokens:
                self.sched.finish_request(request.request_id, RequestStatus.FINISHED_LENGTH)
                del self.cache[request.request_id]
                finished.append(request)
        check_state(self.sched)
        self.steps.append(Step(out, shapes, finished))
        return self.steps[-1]

    def run(self, max_steps: int = 1000) -> list[Step]:
        """Step until every request is finished; returns the steps taken."""
        first = len(self.steps)
        while self.sched.has_unfinished():
            assert len(self.steps) - first < max_steps, "scheduler made no progress"
            self.step()
        return self.steps[first:]

    def _run_model(self, out: SchedulerOutput) -> dict[str, int]:
        for request in out.preempted:  # its blocks are gone, and what they held
            del self.cache[request.request_id]
        sampled = {}
        for chunk in out.chunks:
            cached = self.cache.setdefault(chunk.request_id, [])
            # A chunk writes exactly after the slots the sequence already holds.
            assert chunk.slot_start == len(cached)
            cached += chunk.request.token_ids(chunk.start, chunk.end)
            if chunk.samples:
                sampled[chunk.request_id] = fake_next_token(cached)
        return sampled

    def waiting_ids(self) -> list[str]:
        return [r.request_id for r in self.sched.waiting]

    def running_ids(self) -> list[str]:
        return [r.request_id for r in self.sched.running]


def check_schedule(sched: Scheduler, out: SchedulerOutput) -> None:
    """What must hold for a schedule, before the step's tokens are applied."""
    kv = sched.kv
    assert out.num_batched_tokens <= sched.config.max_num_batched_tokens
    ids = [c.request_id for c in out.chunks]
    assert len(ids) == len(set(ids))
    assert len(ids) <= sched.config.max_num_seqs
    for chunk in out.chunks:
        r = chunk.request
        assert r.status == RequestStatus.RUNNING
        assert chunk.num_tokens >= 1
        assert chunk.start == r.num_computed_tokens
        assert chunk.slot_start == chunk.start  # no eviction: slots == positions
        assert chunk.end <= r.num_tokens
        assert chunk.samples == (chunk.end == r.num_tokens)
        assert kv.num_slots(r.request_id) == chunk.end
    for r in out.preempted:
        assert r.request_id not in ids
        assert r.status == RequestStatus.PREEMPTED
        assert not kv.has(r.request_id)
        assert r.num_computed_tokens == 0
        assert r in sched.waiting
    assert kv.num_blocks_held() == kv.num_used_blocks


def check_state(sched: Scheduler) -> None:
    """What must hold between steps."""
    kv = sched.kv
    assert kv.num_blocks_held() == kv.num_used_blocks
    assert len(sched.running) <= sched.config.max_num_seqs
    for r in sched.running:
        assert r.status == RequestStatus.RUNNING
        assert kv.num_slots(r.request_id) == r.num_computed_tokens
        assert len(kv.block_table(r.request_id)) == blocks_for(r.num_computed_tokens, kv.block_size)
    for r in sched.waiting:
        assert r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
        assert r.num_computed_tokens == 0
        assert not kv.has(r.request_id)
    queued = [r.request_id for r in sched.running] + [r.request_id for r in sched.waiting]
    assert sorted(queued) == sorted(sched.requests)


# -- configuration and requests ----------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [({"max_num_seqs": 0}, "max_num_seqs"), ({"max_num_batched_tokens": 0}, "max_num_batched")],
)
def test_scheduler_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SchedulerConfig(**kwargs)


def test_request_needs_a_prompt():
    with pytest.raises(ValueError, match="at least one token"):
        Request("r", [], 4)


def test_request_token_ids_span_prompt_and_outputs():
    r = Request("r", [1, 2, 3], 4)
    r.output_token_ids += [7, 8]
    assert r.num_tokens == 5
    assert r.max_total_tokens == 7
    assert r.token_ids(0, 3) == [1, 2, 3]
    assert r.token_ids(1, 4) == [2, 3, 7]
    assert r.token_ids(3, 5) == [7, 8]
    assert r.token_ids(0, 5) == [1, 2, 3, 7, 8]


def test_finish_reasons():
    assert RequestStatus.FINISHED_STOPPED.finish_reason == "stop"
    assert RequestStatus.FINISHED_LENGTH.finish_reason == "length"
    assert RequestStatus.FINISHED_ABORTED.finish_reason == "abort"
    assert RequestStatus.RUNNING.finish_reason is None
    assert not RequestStatus.PREEMPTED.is_finished
    assert RequestStatus.FINISHED_ERROR.is_finished


def test_empty_scheduler_schedules_nothing():
    sim = Sim()
    out = sim.sched.schedule()
    assert out.is_empty
    assert out.num_batched_tokens == 0
    assert not sim.sched.has_unfinished()


# -- one request -------------------------------------------------------------


def test_single_request_prefills_then_decodes_until_finished():
    sim = Sim(num_blocks=8)
    r = sim.add("a", prompt_len=6, max_tokens=3)
    assert r.status == RequestStatus.WAITING

    s = sim.step()
    assert s.shapes == [("a", 0, 6, 0, True)]
    assert r.status == RequestStatus.RUNNING
    assert (r.num_computed_tokens, len(r.output_token_ids)) == (6, 1)
    assert len(sim.kv.block_table("a")) == 2
    assert not s.finished

    s = sim.step()
    assert s.shapes == [("a", 6, 1, 6, True)]
    assert sim.cache["a"] == r.prompt_token_ids + r.output_token_ids[:1]
    s = sim.step()
    assert s.shapes == [("a", 7, 1, 7, True)]
    assert s.finished == [r]
    assert r.status == RequestStatus.FINISHED_LENGTH
    assert r.output_token_ids == expected_outputs(r)
    assert not sim.sched.has_unfinished()
    assert sim.kv.num_used_blocks == 0


# -- batching order and budgets ----------------------------------------------


def test_decodes_are_scheduled_before_waiting_prefills():
    sim = Sim(max_num_batched_tokens=6)
    reqs = [sim.add("a", 4), sim.add("b", 4)]
    assert sim.step().shapes == [("a", 0, 4, 0, True), ("b", 0, 2, 0, False)]
    reqs.append(sim.add("c", 5))
    # a decodes, b finishes its prefill, and only then c starts.
    assert sim.step().shapes == [
        ("a", 4, 1, 4, True),
        ("b", 2, 2, 2, True),
        ("c", 0, 3, 0, False),
    ]
    assert sim.step().shapes == [
        ("a", 5, 1, 5, True),
        ("b", 4, 1, 4, True),
        ("c", 3, 2, 3, True),
    ]
    sim.run()
    assert [r.output_token_ids for r in reqs] == [expected_outputs(r) for r in reqs]


def test_long_prompt_is_chunked_under_the_token_budget():
    sim = Sim(max_num_batched_tokens=8)
    r = sim.add("a", prompt_len=20, max_tokens=2)

    assert sim.step().shapes == [("a", 0, 8, 0, False)]
    assert r.output_token_ids == []
    assert (r.num_computed_tokens, len(sim.kv.block_table("a"))) == (8, 2)
    assert sim.step().shapes == [("a", 8, 8, 8, False)]
    assert r.output_token_ids == []
    assert (r.num_computed_tokens, len(sim.kv.block_table("a"))) == (16, 4)
    assert sim.step().shapes == [("a", 16, 4, 16, True)]
    assert r.output_token_ids == expected_outputs(r)[:1]
    assert (r.num_computed_tokens, len(sim.kv.block_table("a"))) == (20, 5)
    assert sim.step().shapes == [("a", 20, 1, 20, True)]
    assert r.output_token_ids == expected_outputs(r)


def test_chunked_prefill_shares_the_budget_with_decodes():
    sim = Sim(max_num_batched_tokens=8)
    sim.add("a", 3, max_tokens=10)
    sim.step()
    b = sim.add("b", 20, max_tokens=2)
    shapes = [sim.step().shapes for _ in range(3)]
    assert shapes == [
        [("a", 3, 1, 3, True), ("b", 0, 7, 0, False)],
        [("a", 4, 1, 4, True), ("b", 7, 7, 7, False)],
        [("a", 5, 1, 5, True), ("b", 14, 6, 14, True)],
    ]
    assert len(b.output_token_ids) == 1


def test_waiting_request_is_chunked_with_whatever_budget_is_left():
    sim = Sim(max_num_batched_tokens=10)
    for rid in "abc":
        sim.add(rid, 4)
    assert sim.step().shapes == [
        ("a", 0, 4, 0, True),
        ("b", 0, 4, 0, True),
        ("c", 0, 2, 0, False),
    ]
    assert sim.sched.requests["c"].output_token_ids == []
    assert sim.step().shapes == [
        ("a", 4, 1, 4, True),
        ("b", 4, 1, 4, True),
        ("c", 2, 2, 2, True),
    ]


def test_budget_used_up_by_running_requests_leaves_waiting_ones_waiting():
    sim = Sim(max_num_batched_tokens=2)
    for rid in "abc":
        sim.add(rid, 1, max_tokens=5)
    assert sim.step().ids == ["a", "b"]
    assert sim.step().ids == ["a", "b"]
    assert sim.waiting_ids() == ["c"]
    assert sim.sched.requests["c"].status == RequestStatus.WAITING


def test_max_num_seqs_caps_the_running_set():
    sim = Sim(max_num_seqs=2)
    sim.add("a", 4, max_tokens=1)
    sim.add("b", 4, max_tokens=3)
    sim.add("c", 4, max_tokens=3)
    sim.add("d", 4, max_tokens=3)
    s = sim.step()
    assert s.ids == ["a", "b"]
    assert [r.request_id for r in s.finished] == ["a"]
    assert sim.waiting_ids() == ["c", "d"]
    # a's seat goes to c; d still waits.
    assert sim.step().ids == ["b", "c"]
    assert sim.waiting_ids() == ["d"]
    assert sim.sched.num_running == 2
    sim.run()
    assert max(len(s.ids) for s in sim.steps) == 2
    assert sim.kv.num_used_blocks == 0


def test_large_request_at_the_head_is_not_overtaken_by_smaller_later_ones():
    # 8 blocks of 4 slots. "a" holds 5 blocks while it runs; "big" needs 4.
    sim = Sim(num_blocks=8)
    sim.add("a", 20, max_tokens=3)
    sim.step()
    sim.add("big", 16, max_tokens=4)
    sim.add("small", 2, max_tokens=2)
    assert sim.kv.num_free_blocks == 3

    # "small" would fit in the free blocks, but "big" is first in line.
    assert sim.step().ids == ["a"]
    assert sim.waiting_ids() == ["big", "small"]
    s = sim.step()
    assert [r.request_id for r in s.finished] == ["a"]
    assert sim.step().shapes == [("big", 0, 16, 0, True), ("small", 0, 2, 0, True)]
    sim.run()
    assert sim.kv.num_used_blocks == 0


def test_admission_needs_room_for_the_whole_prompt_not_just_the_first_chunk():
    sim = Sim(num_blocks=4, max_num_batched_tokens=4)
    sim.add("a", 8, max_tokens=4)
    sim.step()
    sim.step()  # a holds 2 blocks; 2 are free
    sim.add("b", 12, max_tokens=1)
    # b's first 3-token chunk would fit, but its 12-token prompt would not.
    assert sim.step().ids == ["a"]
    assert sim.waiting_ids() == ["b"]
    assert sim.kv.num_free_blocks == 1


# -- preemption --------------------------------------------------------------


def test_decode_without_a_free_block_preempts_the_newest_running_request():
    sim = Sim(num_blocks=4)
    a = sim.add("a", 7, max_tokens=6)
    b = sim.add("b", 7, max_tokens=6)
    sim.step()  # a: 7 slots, b: 7 slots, 2 blocks each
    sim.step()  # both reach 8 slots, still 2 blocks each
    assert sim.kv.num_free_blocks == 0
    b_outputs = list(b.output_token_ids)
    assert len(b_outputs) == 2

    s = sim.step()  # a needs a ninth slot: b goes
    assert s.shapes == [("a", 8, 1, 8, True)]
    assert s.out.preempted == [b]
    assert b.status == RequestStatus.PREEMPTED
    assert b.num_computed_tokens == 0
    assert b.num_preemptions == 1
    assert sim.sched.num_preemptions == 1
    assert not sim.kv.has("b")
    assert b.output_token_ids == b_outputs  # kept, to be recomputed
    assert sim.waiting_ids() == ["b"]
    assert sim.running_ids() == ["a"]
    assert len(sim.kv.block_table("a")) == 3

    # b comes back once a is done, recomputing its prompt and both outputs.
    steps = sim.run()
    readmitted = next(shape for s in steps for shape in s.shapes if shape[0] == "b")
    assert readmitted == ("b", 0, 9, 0, True)
    assert a.output_token_ids == expected_outputs(a)
    assert b.output_token_ids == expected_outputs(b)
    assert b.num_preemptions == 1
    assert sim.kv.num_used_blocks == 0


def test_running_request_that_is_the_newest_preempts_itself():
    sim = Sim(num_blocks=4)
    sim.add("a", 6, max_tokens=2)  # decodes within its 2 blocks
    b = sim.add("b", 8, max_tokens=4)  # needs a third block for its first decode
    sim.step()
    assert sim.kv.num_free_blocks == 0
    s = sim.step()
    assert s.shapes == [("a", 6, 1, 6, True)]
    assert s.preempted_ids == ["b"]
    assert [r.request_id for r in s.finished] == ["a"]
    assert sim.waiting_ids() == ["b"]
    assert sim.step().shapes == [("b", 0, 9, 0, True)]
    sim.run()
    assert b.output_token_ids == expected_outputs(b)
    assert sim.kv.num_used_blocks == 0


def test_several_preemptions_in_one_step_keep_arrival_order_in_waiting():
    sim = Sim(num_blocks=4, block_size=2)
    reqs = [sim.add(rid, 2, max_tokens=4) for rid in "abcd"]
    sim.add("e", 1, max_tokens=1)
    sim.step()  # a-d fill one block each; e does not fit
    assert sim.waiting_ids() == ["e"]

    s = sim.step()  # a and b each need a block: d, then c are preempted
    assert s.ids == ["a", "b"]
    assert s.preempted_ids == ["d", "c"]
    assert sim.waiting_ids() == ["c", "d", "e"]
    assert sim.sched.num_preemptions == 2
    assert [r.status for r in reqs[2:]] == [RequestStatus.PREEMPTED] * 2

    sim.run()
    for r in reqs:
        assert r.status == RequestStatus.FINISHED_LENGTH
        assert r.output_token_ids == expected_outputs(r)
    assert sim.kv.num_used_blocks == 0


def test_preempted_request_goes_back_ahead_of_requests_already_waiting():
    sim = Sim(num_blocks=5)
    a = sim.add("a", 4, max_tokens=3)  # 1 full block: its first decode needs another
    b = sim.add("b", 16, max_tokens=4)  # 4 blocks
    sim.step()
    assert sim.kv.num_free_blocks == 0
    c = sim.add("c", 1, max_tokens=1)
    s = sim.step()
    assert s.ids == ["a"]
    assert s.preempted_ids == ["b"]
    # b goes to the front: c, though it would fit in the 3 blocks b left, waits behind it.
    assert sim.kv.num_free_blocks == 3
    assert sim.waiting_ids() == ["b", "c"]
    assert c.status == RequestStatus.WAITING
    sim.run()
    assert [r.output_token_ids for r in (a, b, c)] == [expected_outputs(r) for r in (a, b, c)]
    assert sim.kv.num_used_blocks == 0


def test_preempted_request_waits_until_its_prompt_and_outputs_fit():
    sim = Sim(num_blocks=6, max_num_batched_tokens=4)
    a = sim.add("a", 8, max_tokens=9)
    b = sim.add("b", 8, max_tokens=4)
    for _ in range(6):
        sim.step()
    assert sim.kv.num_free_blocks == 0
    s = sim.step()
    assert s.preempted_ids == ["b"]
    assert b.num_tokens == 10  # 3 blocks to recompute; its prompt alone needs 2
    assert sim.kv.num_free_blocks == 2
    # Readmitting b on its prompt alone would only preempt it again mid-recompute.
    while not s.finished:
        s = sim.step()
        assert s.ids == ["a"]
    assert s.finished == [a]
    assert sim.step().shapes == [("b", 0, 4, 0, False)]
    sim.run()
    assert b.num_preemptions == 1
    assert b.output_token_ids == expected_outputs(b)


def test_preempted_request_with_a_long_history_is_recomputed_in_chunks():
    sim = Sim(num_blocks=6, max_num_batched_tokens=8)
    a = sim.add("a", 8, max_tokens=14)
    b = sim.add("b", 8, max_tokens=10)
    steps = sim.run()
    assert b.num_preemptions >= 1
    b_shapes = [shape for s in steps for shape in s.shapes if shape[0] == "b"]
    # After its last preemption b starts again from position 0 ...
    restart = max(i for i, shape in enumerate(b_shapes) if shape[1] == 0)
    recompute = []
    for shape in b_shapes[restart:]:
        recompute.append(shape)
        if shape[4]:
            break
    # ... in budget-sized chunks that follow each other, only the last sampling.
    assert len(recompute) >= 2
    assert all(n <= 8 for _, _, n, _, _ in recompute)
    assert [start for _, start, *_ in recompute[1:]] == [
        start + n for _, start, n, *_ in recompute[:-1]
    ]
    assert [samples for *_, samples in recompute] == [False] * (len(recompute) - 1) + [True]
    assert a.output_token_ids == expected_outputs(a)
    assert b.output_token_ids == expected_outputs(b)
    assert sim.kv.num_used_blocks == 0


@pytest.mark.parametrize("seed", range(8))
def test_tiny_pool_simulation_finishes_every_request_and_empties_the_pool(seed):
    rng = random.Random(seed)
    num_blocks = 10
    sim = Sim(
        num_blocks=num_blocks,
        max_num_seqs=rng.choice([3, 4, 8]),
        max_num_batched_tokens=rng.choice([5, 8, 16, 64]),
    )
    pending = [
        make_request(f"r{i}", prompt_len, max_tokens=rng.randint(1, 20))
        for i, prompt_len in enumerate(rng.randint(1, 14) for _ in range(12))
    ]
    requests = list(pending)
    # Half arrive up front, the rest one per step.
    for _ in range(6):
        sim.sched.add_request(pending.pop(0))
    while pending:
        sim.sched.add_request(pending.pop(0))
        sim.step()
    sim.run()

    for r in requests:
        assert r.status == RequestStatus.FINISHED_LENGTH
        assert r.output_token_ids == expected_outputs(r)
    # Worth something only if the pool was tight enough to preempt.
    assert sim.sched.num_preemptions > 0
    assert sim.sched.num_preemptions == sum(r.num_preemptions for r in requests)
    assert sim.kv.num_used_blocks == 0
    assert sim.kv.num_free_blocks == num_blocks
    assert not sim.sched.waiting and not sim.sched.running and not sim.sched.requests
    assert not sim.cache


@pytest.mark.parametrize("seed", range(4))
def test_burst_of_long_requests_on_a_tiny_pool_all_finish(seed):
    rng = random.Random(seed)
    sim = Sim(num_blocks=10, max_num_seqs=8, max_num_batched_tokens=16)
    reqs = [sim.add(f"r{i}", rng.randint(4, 14), max_tokens=20) for i in range(8)]
    sim.run()
    assert sim.sched.num_preemptions > 0
    for r in reqs:
        assert r.output_token_ids == expected_outputs(r)
    assert sim.kv.num_used_blocks == 0


# -- abort, finish, admission errors -----------------------------------------


def test_abort_waiting_request():
    sim = Sim(max_num_seqs=1)
    sim.add("a", 4)
    sim.add("b", 4)
    sim.step()
    aborted = sim.abort("b")
    assert aborted.status == RequestStatus.FINISHED_ABORTED
    assert aborted.status.finish_reason == "abort"
    assert sim.waiting_ids() == []
    assert "b" not in sim.sched.requests
    assert sim.kv.num_used_blocks == 1


def test_abort_running_request_frees_its_blocks():
    sim = Sim(num_blocks=8)
    sim.add("a", 9)
    sim.add("b", 4)
    sim.step()
    assert sim.kv.num_used_blocks == 4
    aborted = sim.abort("a")
    assert aborted.status == RequestStatus.FINISHED_ABORTED
    assert sim.running_ids() == ["b"]
    assert not sim.kv.has("a")
    assert sim.kv.num_used_blocks == 1
    check_state(sim.sched)
    assert sim.step().ids == ["b"]


def test_abort_preempted_request():
    sim = Sim(num_blocks=4)
    a = sim.add("a", 7, max_tokens=6)
    sim.add("b", 7, max_tokens=6)
    sim.step()
    sim.step()
    assert sim.step().preempted_ids == ["b"]
    aborted = sim.abort("b")
    assert aborted.status == RequestStatus.FINISHED_ABORTED
    assert sim.waiting_ids() == []
    assert sim.kv.num_used_blocks == 3
    sim.run()
    assert a.output_token_ids == expected_outputs(a)
    assert sim.kv.num_used_blocks == 0


def test_abort_mid_prefill_frees_the_partial_blocks():
    sim = Sim(num_blocks=8, max_num_batched_tokens=8)
    sim.add("a", 20)
    sim.step()
    assert sim.kv.num_used_blocks == 2
    sim.abort("a")
    assert sim.kv.num_used_blocks == 0
    assert sim.sched.schedule().is_empty


def test_abort_between_schedule_and_update_drops_the_sampled_token():
    sim = Sim()
    a = sim.add("a", 4)
    b = sim.add("b", 4)
    out = sim.sched.schedule()
    sim.abort("a")
    updated = sim.sched.update_from_output(out, {"a": 1, "b": 2})
    assert updated == [b]
    assert a.output_token_ids == []
    assert a.num_computed_tokens == 0
    assert a.status == RequestStatus.FINISHED_ABORTED
    assert b.output_token_ids == [2]
    assert sim.kv.num_used_blocks == 1


def test_abort_unknown_or_finished_request_returns_none():
    sim = Sim()
    assert sim.abort("nope") is None
    sim.add("a", 2, max_tokens=1)
    sim.step()
    assert not sim.sched.has_unfinished()
    assert sim.abort("a") is None


def test_finish_request_needs_a_finished_state():
    sim = Sim()
    sim.add("a", 2)
    with pytest.raises(ValueError, match="RUNNING"):
        sim.sched.finish_request("a", RequestStatus.RUNNING)
    assert sim.waiting_ids() == ["a"]


def test_finish_request_stopped_frees_blocks():
    sim = Sim()
    sim.add("a", 5)
    sim.step()
    r = sim.sched.finish_request("a", RequestStatus.FINISHED_STOPPED)
    assert r.status.finish_reason == "stop"
    assert sim.kv.num_used_blocks == 0
    assert not sim.sched.has_unfinished()


def test_request_larger_than_the_whole_pool_is_refused():
    sim = Sim(num_blocks=4)  # 16 slots
    with pytest.raises(ValueError, match=r"needs 5 KV blocks for 17 tokens.*whole pool has 4"):
        sim.add("a", 10, max_tokens=7)
    assert not sim.sched.has_unfinished()
    assert sim.waiting_ids() == []
    # Exactly the pool is fine, and runs to the end on its own.
    r = sim.add("b", 10, max_tokens=6)
    sim.run()
    assert r.output_token_ids == expected_outputs(r)


def test_duplicate_request_ids_are_refused():
    sim = Sim()
    sim.add("a", 3)
    with pytest.raises(ValueError, match="'a' is already in use"):
        sim.add("a", 3)
    sim.step()  # a is running now
    with pytest.raises(ValueError, match="already in use"):
        sim.add("a", 5)
    assert sim.running_ids() == ["a"]
    assert sim.waiting_ids() == []
    # Once finished, the id is free again.
    sim.abort("a")
    sim.add("a", 3)
    assert sim.waiting_ids() == ["a"]


def test_applied_evictions_shrink_block_tables_and_free_blocks_at_once():
    """The engine reports cuts; the scheduler, the one writer of KV memory,
    shrinks each sequence and the freed blocks are admissible at once."""
    sim = Sim(num_blocks=8)
    sim.add("a", 13)  # 4 blocks
    sim.add("b", 9)  # 3 blocks
    sim.step()
    assert sim.kv.num_used_blocks == 7
    sim.sched.apply_evictions([SlotCut("a", 5), SlotCut("b", 9)])
    assert (sim.kv.num_slots("a"), len(sim.kv.block_table("a"))) == (5, 2)
    assert (sim.kv.num_slots("b"), len(sim.kv.block_table("b"))) == (9, 3)
    assert sim.kv.num_used_blocks == 5
    assert sim.sched.num_tokens_evicted == 8
    assert sim.sched.num_blocks_freed_by_eviction == 2
    # A 12-token prompt needs 3 blocks: it fits only in what eviction freed.
    sim.add("c", 12)
    out = sim.sched.schedule()
    shapes = {c.request_id: (c.start, c.slot_start) for c in out.chunks}
    assert shapes == {"a": (13, 5), "b": (9, 9), "c": (0, 0)}  # a appends after its 5 slots
    assert sim.kv.num_used_blocks == 8


def test_an_eviction_may_not_grow_a_sequence():
    sim = Sim(num_blocks=8)
    sim.add("a", 6)
    sim.step()
    with pytest.raises(ValueError, match="cannot shrink"):
        sim.sched.apply_evictions([SlotCut("a", 7)])
