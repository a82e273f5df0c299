"""Continuous batching under a token budget, with chunked prefill and preemption."""

import time
from collections import deque
from dataclasses import dataclass

from kv_manager import KVCacheManager
from kv_manager.manager import blocks_for
from scheduler.output import ScheduledChunk, SchedulerOutput, SlotCut
from scheduler.pressure import PressureValve, SqueezePlan, Squeezer, squeezable
from scheduler.request import Request, RequestStatus


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )


class Scheduler:
    """Owns the waiting and running queues and decides what runs each step.

    Each step: running requests first (decodes and unfinished prefill chunks,
    oldest first), then waiting requests in arrival order while the token
    budget, `max_num_seqs` and the block pool allow. When a running request
    cannot get a block, the newest running request is preempted: its blocks
    are freed and it is recomputed later from its tokens so far. With a
    `squeezer`, running sequences that allow it (kv_pressure squeeze) are
    squeezed first, and squeezed to admit the head of the waiting queue
    when that frees enough for it (scheduler/pressure.py).
    """

    def __init__(
        self, config: SchedulerConfig, kv: KVCacheManager, squeezer: Squeezer | None = None
    ) -> None:
        self.config = config
        self.kv = kv
        self.valve = None if squeezer is None else PressureValve(kv, squeezer, self._squeezed)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.num_tokens_evicted = 0  # slots dropped by eviction (per sequence)
        self.num_blocks_freed_by_eviction = 0
        self.num_squeezes = 0
        self.num_tokens_evicted_by_squeeze = 0  # also counted in num_tokens_evicted

    # -- queue operations ----------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a new request (FCFS). Fails if it could never fit in the pool."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        # NOTE: counted at its compressed size: an evicting sequence holds at
        # most its budget plus one prefill chunk, however long its prompt.
        self._check_fits(request)
        request.status = RequestStatus.WAITING
        self.waiting.append(request)
        self.requests[request.request_id] = request

    def _check_fits(self, request: Request) -> None:
        """A ValueError (its first word the field to blame: prompt) for a
        request whose peak could never fit in the whole pool."""
        peak = request.peak_slots(self.config.max_num_batched_tokens)
        need, total = blocks_for(peak, self.kv.block_size), self.kv.num_total_blocks
        if need <= total:
            return
        if request.slot_budget is None:
            held = f"plus max_tokens ({request.max_tokens}), all held without eviction,"
        elif request.kv.budget_pending and request.slot_budget >= request.num_prompt_tokens:
            held = (
                "held whole until its budget is chosen from kv_target_mass at its end "
                "(kv_max_tokens compresses it while it prefills),"
            )
        else:
            held = (
                f"compressed to its budget ({request.slot_budget} tokens) plus one "
                f"prefill chunk ({self.config.max_num_batched_tokens} tokens),"
            )
        raise ValueError(
            f"prompt ({request.num_prompt_tokens} tokens) {held} needs {need} KV blocks "
            f"for {peak} tokens, but the whole pool has {total} "
            f"({total * self.kv.block_size} tokens)"
        )

    def abort_request(self, request_id: str) -> Request | None:
        """Stop a request wherever it is and free its blocks."""
        return self.finish_request(request_id, RequestStatus.FINISHED_ABORTED)

    def finish_request(self, request_id: str, status: RequestStatus) -> Request | None:
        """Move a request to a finished state and free its blocks."""
        if not status.is_finished:
            raise ValueError(f"{status.name} is not a finished state")
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self.kv.free(request_id)
        request.status = status
        request.finished_time = time.monotonic()
        return request

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # -- one step ------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Pick this step's chunks and reserve their KV slots."""
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        limit = self._squeeze_or_preempt(out, budget)
        budget = self._schedule_running(out, budget)
        # NOTE: after a preemption memory is short: admitting new work now
        # would only preempt again next step.
        if not out.preempted:
            self._schedule_waiting(out, budget, limit)
        return out

    def _squeeze_or_preempt(self, out: SchedulerOutput, budget: int) -> int | None:
        """Make room for the running set by squeezing (scheduler/pressure.py)
        where squeezing covers the shortage, else preempt the newest and plan
        again; then squeeze to admit waiting requests. Returns how many
        waiting requests may be admitted when anything was squeezed (None:
        as many as fit). Without a sequence that allows squeezing,
        `_schedule_running` preempts as it always has."""
        if self.valve is None or not any(squeezable(r) for r in self.running):
            return None
        while self.running:
            plan = self.valve.plan(self._running_plan(budget))
            # NOTE: squeezes that cannot spare a preemption are not made: a
            # preemption frees more than they would, and may make them moot.
            if plan.cover():
                break
            victim = self.running.pop()
            self._preempt(victim)
            out.preempted.append(victim)
        if out.preempted:
            return None
        admitted = self._squeeze_to_admit(plan, budget)
        self.valve.squeeze(plan)
        # NOTE: after a squeeze only what the plan made room for comes in: any
        # more would squeeze or preempt again next step.
        return admitted if plan.chosen else None

    def _squeeze_to_admit(self, plan: SqueezePlan, budget: int) -> int:
        """How many waiting requests, from the head, the plan makes room for,
        squeezing as it must, as `_schedule_waiting` admits them (each on its
        prefill's peak; `max_num_seqs` and the token budget bound them)."""
        budget -= plan.num_tokens
        seats = self.config.max_num_seqs - len(self.running)
        admitted = 0
        for request in self.waiting:
            if budget <= 0 or admitted >= seats:
                break
            if not plan.cover(blocks_for(self._prefill_slots(request), self.kv.block_size)):
                break  # strictly FCFS, as admission: nothing is squeezed for later ones
            budget -= min(self._chunk_tokens(request), budget)
            admitted += 1
        return admitted

    def _running_plan(self, budget: int) -> list[tuple[Request, int]]:
        """Each running request and the tokens `_schedule_running` gives it
        this step (0 past the token budget), before anything is reserved."""
        plan = []
        for request in self.running:
            n = max(0, min(self._chunk_tokens(request), budget))
            plan.append((request, n))
            budget -= n
        return plan

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = min(self._chunk_tokens(request), budget)
            if not self._reserve_or_preempt(request, n, out):
                break  # the request preempted itself; everything after it is gone
            budget -= n
            i += 1
        return budget

    def _chunk_tokens(self, request: Request) -> int:
        """The tokens a running request computes next, before the token budget:
        the rest of its tokens, but a prompt chunk of an evicting sequence ends
        at its next cut point (Request.cut_point)."""
        n = request.num_tokens - request.num_computed_tokens
        cut = request.cut_point(self.config.max_num_batched_tokens)
        return n if cut is None else min(n, cut - request.num_computed_tokens)

    def _squeezed(self, request: Request, cut: SlotCut) -> None:
        """Record a squeeze the engine made and free the blocks past it."""
        before = self.kv.num_slots(request.request_id)
        self.apply_evictions([cut])
        request.squeezes.append((request.num_computed_tokens, cut.num_slots))
        self.num_squeezes += 1
        self.num_tokens_evicted_by_squeeze += before - cut.num_slots

    def _reserve_or_preempt(self, request: Request, n: int, out: SchedulerOutput) -> bool:
        """Reserve `n` slots for a running request, preempting the newest as needed."""
        while True:
            slot_start = self.kv.num_slots(request.request_id)
            if self.kv.allocate_slots(request.request_id, n):
                out.chunks.append(
                    ScheduledChunk(request, request.num_computed_tokens, n, slot_start)
                )
                return True
            victim = self.running.pop()
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is request:
                return False

    def _preempt(self, request: Request) -> None:
        self.kv.free(request.request_id)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        # Popped newest-first, so pushing each to the front keeps arrival order.
        self.waiting.appendleft(request)

    def _schedule_waiting(self, out: SchedulerOutput, budget: int, limit: int | None) -> None:
        seats = self.config.max_num_seqs - len(self.running)
        seats = seats if limit is None else min(seats, limit)
        while self.waiting and budget > 0 and seats > 0:
            request = self.waiting[0]
            # Admit only when the prefill's peak fits in the free blocks, not
            # just this chunk; strictly FCFS, so a large request at the head is
            # never starved by small ones.
            need = blocks_for(self._prefill_slots(request), self.kv.block_size)
            if need > self.kv.num_free_blocks:
                break
            n = min(self._chunk_tokens(request), budget)
            if not self.kv.allocate_slots(request.request_id, n):
                break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:  # not again after a preemption
                request.first_scheduled_time = time.monotonic()
            self.running.append(request)
            out.chunks.append(ScheduledChunk(request, 0, n, 0))
            budget -= n
            seats -= 1

    def _prefill_slots(self, request: Request) -> int:
        """Slots a (re)prefill needs at its peak."""
        if request.slot_budget is None:
            return request.num_tokens
        # An evicting sequence is cut back to its budget after every chunk.
        chunk = self.config.max_num_batched_tokens
        return min(request.num_tokens, request.slot_budget + chunk)

    def apply_evictions(self, cuts: list[SlotCut]) -> None:
        """Shrink each cut sequence to the slots it keeps, freeing the blocks
        past them: the KV manager changes only through the scheduler."""
        for cut in cuts:
            before = self.kv.num_slots(cut.request_id)
            self.num_blocks_freed_by_eviction += self.kv.shrink(cut.request_id, cut.num_slots)
            self.num_tokens_evicted += before - cut.num_slots

    def update_from_output(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Advance each scheduled request; append the tokens sampled for it.

        Returns the requests that received a new token. Stop checks are the
        engine's; it calls `finish_request` for requests that are done.
        """
        updated = []
        now = time.monotonic()
        for chunk in out.chunks:
            request = chunk.request
            if request.status != RequestStatus.RUNNING:
                continue  # aborted while the step ran
            request.num_computed_tokens += chunk.num_tokens
            token = sampled.get(request.request_id)
            if token is not None:
                request.output_token_ids.append(token)
                if request.first_token_time is None:
                    request.first_token_time = now
                request.last_token_time = now
                updated.append(request)
        return updated
