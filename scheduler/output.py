"""The typed boundary between the scheduler and the engine for one step."""

from dataclasses import dataclass, field

from scheduler.request import Request


@dataclass
class ScheduledChunk:
    """A contiguous run of one request's tokens to compute this step."""

    request: Request
    # First token of the chunk, as an index into prompt + output tokens; also
    # its logical position.
    start: int
    # Number of tokens in the chunk (1 for a decode).
    num_tokens: int
    # First KV slot the chunk's tokens are written to (the slot count before
    # this step). Equals `start` unless eviction has shrunk the sequence.
    slot_start: int

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    # True when the chunk reaches the sequence's end, so a token is sampled.
    # Fixed when the chunk is made: the request grows once the token is in.
    samples: bool = field(init=False)

    def __post_init__(self) -> None:
        self.samples = self.end == self.request.num_tokens

    @property
    def request_id(self) -> str:
        return self.request.request_id


@dataclass
class SchedulerOutput:
    """What to run this step."""

    # Decodes and prefill chunks, in the order the scheduler picked them.
    chunks: list[ScheduledChunk] = field(default_factory=list)
    # Requests preempted while building this batch (their blocks are free).
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


@dataclass(frozen=True)
class SlotCut:
    """An eviction the engine made: the sequence's first `num_slots` slots now
    hold everything it keeps; the scheduler frees the blocks past them."""

    request_id: str
    num_slots: int
