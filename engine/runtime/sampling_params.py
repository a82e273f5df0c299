"""Per-request sampling settings, named and validated as vLLM's are."""

import math
from dataclasses import dataclass, field

from engine.runtime.structured_output.params import StructuredOutputsParams
from kv_manager.policies import KVPolicyOverrides

# Below this a temperature means greedy decoding.
GREEDY_EPSILON = 1e-5
MAX_LOGPROBS = 20
# OpenAI's range for a logit bias: -100 bans a token, 100 all but forces it.
MAX_LOGIT_BIAS = 100.0


@dataclass
class SamplingParams(KVPolicyOverrides):
    """One request's sampling settings, and its KV policy: the KV fields
    (kv_policy, kv_ratio, ...; keyword-only, None: the engine's default) and
    their checks come from KVPolicyOverrides, i.e. from KVPolicySettings."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the context (full: what the pool holds)
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # top-N alternatives per generated token
    # Top-N alternatives per prompt token (vLLM's): each prompt token's own
    # logprob too; the first token has none.
    prompt_logprobs: int | None = None
    # Token id -> value added to its logit before sampling (vLLM's, OpenAI's).
    logit_bias: dict[int, float] | None = None
    skip_special_tokens: bool = True
    # What the output must follow (a JSON schema, regex, choice, grammar;
    # vLLM's field): the engine masks every step's logits to it and finishes
    # the sequence when it is complete. A dict is taken as its keyword arguments.
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        super().__post_init__()  # the KV fields
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self.logit_bias = dict(self.logit_bias) if self.logit_bias else None
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        self._validate()
        self._validate_logit_bias()

    def _validate(self) -> None:
        checks = [
            (self.n >= 1, "n", "must be at least 1"),
            (self.temperature >= 0.0, "temperature", "must be non-negative"),
            (0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]"),
            (self.top_k >= 0, "top_k", "must be 0 or -1 (off) or a positive integer"),
            (0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "must be in [-2, 2]"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "must be in [-2, 2]"),
            (self.repetition_penalty > 0.0, "repetition_penalty", "must be positive"),
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens", "must be at least 1"),
            (self.min_tokens >= 0, "min_tokens", "must be non-negative"),
            (
                self.max_tokens is None or self.min_tokens <= self.max_tokens,
                "min_tokens",
                "must not exceed max_tokens",
            ),
            (
                self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
                "logprobs",
                f"must be between 0 and {MAX_LOGPROBS}",
            ),
            (
                self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
                "prompt_logprobs",
                f"must be between 0 and {MAX_LOGPROBS}",
            ),
            (all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings"),
            (
                all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
                "stop_token_ids",
                "must be non-negative integers",
            ),
        ]
        for ok, name, rule in checks:
            if not ok:
                raise ValueError(f"{name} {rule}, got {getattr(self, name)!r}")

    def _validate_logit_bias(self) -> None:
        """Keys are token ids (ints; the engine checks them against its
        vocabulary), values finite and within [-100, 100]."""
        for token_id, bias in (self.logit_bias or {}).items():
            if not isinstance(token_id, int) or isinstance(token_id, bool):
                raise ValueError(f"logit_bias key {token_id!r} is not an integer token id")
            if (
                isinstance(bias, bool)
                or not isinstance(bias, int | float)
                or not math.isfinite(bias)
            ):
                raise ValueError(f"logit_bias value for token {token_id} must be a number")
            if abs(bias) > MAX_LOGIT_BIAS:
                raise ValueError(
                    f"logit_bias value for token {token_id} must be in "
                    f"[-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {bias!r}"
                )

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPSILON
