"""What the engine returns: one RequestOutput per request, vLLM-shaped."""

from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float
    rank: int  # 1 = most likely
    decoded_token: str | None = None


# One dict per generated token: token id -> its Logprob (the sampled token
# plus the top-N alternatives).
SampleLogprobs = list[dict[int, Logprob]]
# One entry per prompt token, as vLLM's: None for the first (nothing precedes
# it), then the token's own Logprob plus the top-N alternatives.
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: SampleLogprobs | None = None
    finish_reason: str | None = None  # "stop", "length", "abort", "error"
    # The stop string or stop token id that ended generation, if any.
    stop_reason: str | int | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """When things happened to a request, in time.monotonic() seconds (vLLM's
    field names; None: not yet). Differences are what matter: TTFT is
    first_token_time - arrival_time."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None

    @staticmethod
    def merge(metrics: "list[RequestMetrics | None]") -> "RequestMetrics | None":
        """One timeline for the sequences of one request (n > 1): the first
        arrival, schedule and token, the last token and finish."""
        known = [m for m in metrics if m is not None]
        if not known:
            return None

        def first(name: str) -> float | None:
            return min((v for m in known if (v := getattr(m, name)) is not None), default=None)

        def last(name: str) -> float | None:
            return max((v for m in known if (v := getattr(m, name)) is not None), default=None)

        return RequestMetrics(
            min(m.arrival_time for m in known),
            first("first_scheduled_time"),
            first("first_token_time"),
            last("last_token_time"),
            last("finished_time"),
        )

    @property
    def time_in_queue(self) -> float | None:
        """Seconds from arrival to the first step that ran it."""
        if self.first_scheduled_time is None:
            return None
        return self.first_scheduled_time - self.arrival_time


@dataclass(frozen=True)
class KVUsage:
    """What the KV policy did with a request's cache (the HTTP usage block's
    kv_cache_details)."""

    policy: str
    budget: int | None  # slots the policy keeps; None: it keeps every token
    # The budget squeezes left it (kv_pressure squeeze); None: never squeezed.
    squeezed_budget: int | None = None
    num_squeezes: int = 0
    # The kv_target_mass `budget` was chosen for at the prompt's end (None:
    # the budget came from kv_ratio); before the prompt ends, `budget` is the
    # most the choice could give.
    target_mass: float | None = None

    @staticmethod
    def merge(usages: "list[KVUsage | None]") -> "KVUsage | None":
        """One usage for several sequences of one request (n > 1, or several
        prompts): the smallest budget, the lowest budget a squeeze left, and
        all their squeezes."""
        known = [u for u in usages if u is not None]
        if not known:
            return None
        budgets = [u.budget for u in known if u.budget is not None]
        squeezed = [u.squeezed_budget for u in known if u.squeezed_budget is not None]
        return KVUsage(
            known[0].policy,
            min(budgets, default=None),
            min(squeezed, default=None),
            sum(u.num_squeezes for u in known),
            known[0].target_mass,
        )


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    metrics: RequestMetrics | None = None
    # With SamplingParams(prompt_logprobs=N); None otherwise.
    prompt_logprobs: PromptLogprobs | None = None
    kv: KVUsage | None = None
