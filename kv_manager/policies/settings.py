"""Per-request KV policy settings, validated, and the budget rule."""

import math
from dataclasses import dataclass, fields, replace
from typing import Any

POLICY_NAMES = ("full", "window", "streaming", "h2o", "keyformer")


@dataclass(frozen=True)
class KVPolicySettings:
    """How one request's cache is cut (keyformer.md has the rules).

    The budget is k = max(floor(n * kv_ratio), kv_min_tokens) for a prompt of
    n tokens, capped by kv_max_tokens when set; a sequence under k never evicts.
    """

    kv_policy: str = "full"
    kv_ratio: float = 0.5
    kv_max_tokens: int | None = None
    kv_min_tokens: int = 128
    recent_ratio: float = 0.3
    sink_tokens: int = 4
    tau_init: float = 1.0
    tau_end: float = 2.0

    def __post_init__(self) -> None:
        checks = [
            (self.kv_policy in POLICY_NAMES, "kv_policy", f"must be one of {list(POLICY_NAMES)}"),
            (
                _finite(self.kv_ratio) and 0.0 < self.kv_ratio <= 1.0,
                "kv_ratio",
                "must be in (0, 1]",
            ),
            (
                self.kv_max_tokens is None or self.kv_max_tokens >= 1,
                "kv_max_tokens",
                "must be at least 1",
            ),
            (self.kv_min_tokens >= 0, "kv_min_tokens", "must be non-negative"),
            (
                _finite(self.recent_ratio) and 0.0 <= self.recent_ratio <= 1.0,
                "recent_ratio",
                "must be in [0, 1]",
            ),
            (self.sink_tokens >= 0, "sink_tokens", "must be non-negative"),
            (_finite(self.tau_init) and self.tau_init > 0.0, "tau_init", "must be positive"),
            (_finite(self.tau_end) and self.tau_end > 0.0, "tau_end", "must be positive"),
        ]
        for ok, name, rule in checks:
            if not ok:
                raise ValueError(f"{name} {rule}, got {getattr(self, name)!r}")

    @property
    def evicts(self) -> bool:
        return self.kv_policy != "full"

    @property
    def needs_scores(self) -> bool:
        return self.kv_policy in ("h2o", "keyformer")

    def budget(self, prompt_len: int) -> int | None:
        """Slots the sequence keeps (k), or None for no eviction."""
        if not self.evicts:
            return None
        k = max(math.floor(prompt_len * self.kv_ratio), self.kv_min_tokens)
        if self.kv_max_tokens is not None:
            k = min(k, self.kv_max_tokens)
        return max(k, 1)

    def recent_window(self, budget: int) -> int:
        """w = floor(k * recent_ratio): the newest tokens that are never evicted."""
        return math.floor(budget * self.recent_ratio)

    def tau(self, step: int, max_new_tokens: int) -> float:
        """Keyformer's temperature after `step` generated tokens (rises linearly)."""
        return self.tau_init + step * (self.tau_end - self.tau_init) / max(max_new_tokens, 1)

    def with_overrides(self, **overrides: Any) -> "KVPolicySettings":
        """A copy with the non-None `overrides` applied (and validated)."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown KV policy settings: {unknown}")
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


# The per-request KV fields, as every layer above spells them (engine config,
# SamplingParams, the HTTP body).
KV_POLICY_FIELDS = tuple(f.name for f in fields(KVPolicySettings))


def _finite(x: float) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)
