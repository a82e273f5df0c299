"""Squeeze before preempting (kv_pressure "squeeze").

When the running set needs more new blocks this step than the pool has free,
the scheduler first lowers the budgets of running evicting sequences that
allow it, one block at a time, the sequence that loses the least retained
score first, and cuts them at once so the blocks are free before the batch is
reserved. It preempts only when nothing is left to squeeze. A sequence is
never squeezed below its `kv_min_tokens`, nor below `kv_squeeze_min_ratio` of
the budget it asked for; `full` sequences never are.

It squeezes to admit too: when the request at the head of the waiting queue
(FCFS, as admission goes) does not fit in the free blocks, the same sequences
are squeezed by the same rule to make room for it, but only when squeezing
can free all it needs; then the next one, while `max_num_seqs` and the token
budget allow. Whether a sequence may be squeezed is its own `kv_pressure`,
whatever the waiting request asked: `squeeze` says "lower my budget rather
than make me or others wait"; the waiting request's own setting speaks for
its budget once it runs.

"Retained score lost" is the share of a sequence's cached score (summed over
its slots, layers and KV heads) that the keys a squeeze would evict hold, so
sequences of any length compare; for the position-only policies (window,
streaming), which keep no score, each key counts alike (the share of keys).
The engine measures it and makes the cut (`Squeezer`): the scheduler knows
block counts, not the scores in the cache tensors.
"""

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from kv_manager import KVCacheManager
from kv_manager.manager import blocks_for
from scheduler.output import SlotCut
from scheduler.request import Request


class Squeezer(Protocol):
    """The engine's side of a squeeze."""

    def lost_score(self, request: Request, budget: int) -> float:
        """The share of the sequence's retained score that cutting it to
        `budget` slots now would evict (0: nothing of worth, 1: all of it)."""
        ...

    def cut(self, request: Request, budget: int) -> SlotCut:
        """Cut the sequence to `budget` slots now, as its policy chooses, with
        what it keeps moved into its first slots; the scheduler frees the rest."""
        ...


def squeezable(request: Request) -> bool:
    """Whether a running request's budget may be lowered under pressure: an
    evicting sequence that asked for it, past its prompt (mid-prompt it is
    cut to its budget at its cut points anyway, and holds at most one chunk
    more; its budget stays as asked until its prompt is in)."""
    kv = request.kv
    return (
        kv is not None
        and request.slot_budget is not None
        and kv.settings.kv_pressure == "squeeze"
        and request.num_computed_tokens >= request.num_prompt_tokens
    )


def squeeze_floor(request: Request) -> int:
    """The least budget a squeeze may leave: kv_min_tokens, and
    kv_squeeze_min_ratio of the budget the request asked for; never 0."""
    settings = request.kv.settings
    # Rounded first, so that a share like 0.55 * 100 = 55.00000000000001 is 55.
    share = math.ceil(round(settings.kv_squeeze_min_ratio * request.kv.budget, 6))
    return max(settings.kv_min_tokens, share, 1)


def squeeze_target(
    request: Request, num_slots: int, new_tokens: int, block_size: int
) -> int | None:
    """The budget one squeeze step takes the sequence to: the largest that
    holds one block fewer at this step's peak (its slots plus the `new_tokens`
    it computes this step), or None when that is below its floor."""
    peak_blocks = blocks_for(num_slots + new_tokens, block_size)
    target = (peak_blocks - 1) * block_size - new_tokens
    return target if target >= squeeze_floor(request) else None


def squeeze_capacity(request: Request, num_slots: int, new_tokens: int, block_size: int) -> int:
    """How many squeeze steps the sequence has before its floor: the blocks
    squeezing it can take off this step's peak (as `squeeze_target` steps)."""
    floor = squeeze_floor(request)
    peak = blocks_for(num_slots + new_tokens, block_size)
    return max(0, peak - blocks_for(floor + new_tokens, block_size))


@dataclass(order=True)
class _Step:
    """One squeeze step of one sequence, ordered by the score it adds to
    what the sequence loses."""

    lost: float
    # Among equal losses the newest goes first, as preemption picks the newest.
    newness: int
    request: Request = field(compare=False)
    new_tokens: int = field(compare=False)
    budget: int = field(compare=False)
    # What cutting to `budget` loses in all (`lost` is the rise over the step before).
    lost_in_all: float = field(compare=False)


class SqueezePlan:
    """The squeezes that make one step's blocks fit, chosen as what the step
    needs grows: first the running set's blocks, then each waiting request's
    admission (`cover`). Nothing is cut until `PressureValve.squeeze`.

    Each step takes exactly one block off its sequence's peak, so how many
    blocks squeezing can free is known from block counts alone
    (`squeeze_capacity`): a shortage it cannot cover is refused before any
    score is read, and nothing is ever squeezed for nothing.
    """

    def __init__(self, valve: "PressureValve", plan: list[tuple[Request, int]]) -> None:
        kv = valve.kv
        self._valve = valve
        # (request, new tokens, index in the plan) of each squeezable one.
        self._candidates = [(r, n, i) for i, (r, n) in enumerate(plan) if squeezable(r)]
        self.num_tokens = sum(n for _, n in plan)
        self.short = sum(kv.blocks_needed(r.request_id, n) for r, n in plan) - kv.num_free_blocks
        self._capacity = sum(
            squeeze_capacity(r, kv.num_slots(r.request_id), n, kv.block_size)
            for r, n, _ in self._candidates
        )
        self._heap: list[_Step] | None = None  # built when a squeeze is first needed
        self._chosen: dict[str, _Step] = {}

    @property
    def chosen(self) -> list[_Step]:
        """One step per squeezed sequence: the last, whose budget it is cut to."""
        return list(self._chosen.values())

    def cover(self, blocks: int = 0) -> bool:
        """Add `blocks` to what the step needs and choose the squeezes that
        make it fit, cheapest first; False, changing nothing, when squeezing
        cannot free enough (`cover()` asks for the blocks already planned)."""
        short = self.short + blocks
        if short > self._capacity:
            return False
        self.short = short
        while self.short > 0:
            self._take_cheapest()
        return True

    def _take_cheapest(self) -> None:
        if self._heap is None:
            first = (self._valve.step(r, n, i, None) for r, n, i in self._candidates)
            self._heap = [s for s in first if s is not None]
            heapq.heapify(self._heap)
        step = heapq.heappop(self._heap)
        self._chosen[step.request.request_id] = step
        self.short -= 1
        self._capacity -= 1
        following = self._valve.step(step.request, step.new_tokens, -step.newness, step)
        if following is not None:
            heapq.heappush(self._heap, following)


class PressureValve:
    """Plans squeezes of running sequences (`SqueezePlan`) and makes them.

    It plans first and cuts after: every step is measured as a cut straight
    from the sequence's cache as it is, and each squeezed sequence is cut
    once, to the last budget planned for it. So the budget a sequence has at
    each step says everything about its cuts (the dense reference takes such
    a schedule).
    """

    def __init__(
        self,
        kv: KVCacheManager,
        squeezer: Squeezer,
        apply: Callable[[Request, SlotCut], None],
    ) -> None:
        self.kv = kv
        self.squeezer = squeezer
        # Records the squeeze and frees the blocks past the cut (the scheduler).
        self.apply = apply

    def plan(self, plan: list[tuple[Request, int]]) -> SqueezePlan:
        """A plan for this step: each running request and the tokens it
        computes this step; `cover()` on it chooses the squeezes they need."""
        return SqueezePlan(self, plan)

    def squeeze(self, plan: SqueezePlan) -> None:
        """Cut each sequence the plan chose to its new budget now."""
        for step in plan.chosen:
            self.apply(step.request, self.squeezer.cut(step.request, step.budget))

    def step(
        self, request: Request, new_tokens: int, index: int, before: _Step | None
    ) -> _Step | None:
        """The sequence's next squeeze step after `before` (None: its first)."""
        slots = self.kv.num_slots(request.request_id) if before is None else before.budget
        budget = squeeze_target(request, slots, new_tokens, self.kv.block_size)
        if budget is None:
            return None
        lost = self.squeezer.lost_score(request, budget)
        rise = lost - (0.0 if before is None else before.lost_in_all)
        return _Step(rise, -index, request, new_tokens, budget, lost)
