"""A request as the scheduler sees it: token ids, progress and state."""

import enum
import time

from kv_manager.policies import SequencePolicy


class RequestStatus(enum.IntEnum):
    """Request states; every finished state sorts after PREEMPTED."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5
    FINISHED_ERROR = 6

    @property
    def is_finished(self) -> bool:
        return self > RequestStatus.PREEMPTED

    @property
    def finish_reason(self) -> str | None:
        """The OpenAI finish reason of a finished state, None otherwise."""
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


class Request:
    """One sequence to generate.

    NOTE: `num_computed_tokens` is the sequence's logical length in the KV
    cache: how many of its tokens (prompt, then outputs) have been through a
    forward pass. It is also the position of the next token to compute. The
    slot count lives in the KV manager and may be smaller once eviction runs.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        max_tokens: int,
        kv: SequencePolicy | None = None,
        arrival_time: float | None = None,
    ) -> None:
        if not prompt_token_ids:
            raise ValueError("prompt must contain at least one token")
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.max_tokens = max_tokens
        # How eviction cuts this sequence's cache; None: it never evicts.
        self.kv = kv
        # Lifecycle times, time.monotonic() seconds (RequestOutput.metrics).
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.finished_time: float | None = None
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_preemptions = 0
        # Budget cuts made while the pool was full (kv_pressure squeeze), in
        # order: (logical length at the cut, the budget after it). A squeezed
        # budget is never raised again: the keys it cut are gone for good.
        self.squeezes: list[tuple[int, int]] = []

    @property
    def slot_budget(self) -> int | None:
        """Slots the sequence is cut back to by eviction, squeezed or not;
        None: it never evicts. A budget chosen at the prompt's end
        (kv_target_mass) below an earlier squeeze's wins over it."""
        budget = None if self.kv is None else self.kv.budget
        if self.squeezes:
            squeezed = self.squeezes[-1][1]
            return squeezed if budget is None else min(squeezed, budget)
        return budget

    @property
    def squeezed_budget(self) -> int | None:
        """The budget squeezes left, or None if it was never squeezed."""
        return self.squeezes[-1][1] if self.squeezes else None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def max_total_tokens(self) -> int:
        """The longest this sequence can grow: prompt plus max_tokens."""
        return len(self.prompt_token_ids) + self.max_tokens

    def peak_slots(self, chunk: int) -> int:
        """The most slots the sequence ever holds at once, prefilled in chunks
        of at most `chunk` tokens.

        Without eviction that is prompt plus max_tokens. With it, the prompt is
        cut back to the budget after every `chunk` prompt tokens (compressed
        while prefilling: engine/runtime/eviction.py), so it holds at most the
        budget plus one chunk (the whole prompt when that is less), then the
        budget plus the one new token each decode step adds before its cut.
        """
        if self.slot_budget is None:
            return self.max_total_tokens
        prefill = min(self.num_prompt_tokens, self.slot_budget + chunk)
        return min(self.max_total_tokens, max(prefill, self.slot_budget + 1))

    def cut_point(self, chunk: int) -> int | None:
        """Where the prompt chunk being computed must end at the latest: the
        next multiple of `chunk` prompt tokens, at which an evicting sequence
        is cut back to its budget (None: no limit, it does not evict or its
        prompt is in, or fits in its budget: it is never cut mid-prompt). Cuts
        at fixed points keep a seeded sequence's output the same whatever else
        shares its batches."""
        n, budget = self.num_computed_tokens, self.slot_budget
        if budget is None or n >= self.num_prompt_tokens or self.num_prompt_tokens <= budget:
            return None
        return (n // chunk + 1) * chunk

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output."""
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, {self.status.name}, prompt={self.num_prompt_tokens}, "
            f"out={len(self.output_token_ids)}, computed={self.num_computed_tokens})"
        )
