"""The KV policy settings, each declared once, validated, and the budget rule.

KVPolicySettings's fields are the one declaration of every KV setting: its
name, type, default, valid values and one line of help. Every layer above
derives its own spelling of them from here rather than repeating them:
SamplingParams inherits KVPolicyOverrides (each field optional), EngineConfig
inherits KVPolicyDefaults (each field with its default), and the HTTP request
model and the CLI flags are built from KV_SETTINGS.
"""

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any, TypeVar, get_args

POLICY_NAMES = ("full", "window", "streaming", "h2o", "keyformer", "snapkv")
# Evicting policies that rank keys by position alone: no score, so no
# kv_target_mass (every other evicting policy scores its keys).
POSITION_POLICIES = ("window", "streaming")
# What a running sequence gives up when the KV pool is full (kv_pressure).
PRESSURE_NAMES = ("preempt", "squeeze")
# snapkv: how a key's window score is pooled over its neighbours.
POOLING_NAMES = ("max", "avg")
# Whether generated tokens' queries add to the scores (h2o, keyformer, snapkv).
DECODE_SCORING_NAMES = ("accumulate", "frozen")
# snapkv's observation window when score_window is unset (SnapKV's own default).
SNAPKV_WINDOW = 32


@dataclass(frozen=True)
class Limits:
    """A setting's valid values: one of `choices`, or a finite number within
    the bounds (pydantic's names: ge >=, gt >, le <=)."""

    choices: tuple[str, ...] | None = None
    ge: float | None = None
    gt: float | None = None
    le: float | None = None

    def allows(self, value: Any) -> bool:
        if self.choices is not None:
            return value in self.choices
        if not math.isfinite(value):
            return False
        return (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
        )

    def rule(self) -> str:
        """What `allows` accepts, worded to follow "must be"."""
        if self.choices is not None:
            return f"one of {list(self.choices)}"
        low, open_low = (self.gt, True) if self.gt is not None else (self.ge, False)
        if low is not None and self.le is not None:
            return f"in {'(' if open_low else '['}{low:g}, {self.le:g}]"
        if low == 0:
            return "positive" if open_low else "non-negative"
        if low is not None:
            return f"{'above' if open_low else 'at least'} {low:g}"
        return f"at most {self.le:g}" if self.le is not None else "a finite number"

    def bounds(self) -> dict[str, float]:
        """The numeric bounds that are set, as keyword arguments (pydantic's Field)."""
        named = {"ge": self.ge, "gt": self.gt, "le": self.le}
        return {k: v for k, v in named.items() if v is not None}


def _setting(default: Any, help: str, **limits: Any) -> Any:
    """A KVPolicySettings field: its default, help line and Limits."""
    return field(default=default, metadata={"help": help, "limits": Limits(**limits)})


@dataclass(frozen=True)
class KVPolicySettings:
    """How one request's cache is cut (keyformer.md has the rules).

    The budget is k = max(floor(n * kv_ratio), kv_min_tokens) for a prompt of
    n tokens, capped by kv_max_tokens when set; a sequence under k never evicts.
    The defaults are the project's point: Keyformer at half the prompt.

    With kv_target_mass set (a scoring policy), kv_ratio is not used: k is
    chosen at the end of the prompt, the fewest keys whose cut keeps that
    share of the score in every (layer, KV head) (policies/target_mass.py),
    floored and capped as above; until then k is the most it could be.
    """

    kv_policy: str = _setting(
        "keyformer",
        "eviction policy: full keeps every token; window, streaming, h2o, keyformer, snapkv evict",
        choices=POLICY_NAMES,
    )
    kv_ratio: float = _setting(0.5, "KV budget as a fraction of the prompt", gt=0.0, le=1.0)
    kv_target_mass: float | None = _setting(
        None,
        "instead of kv_ratio: at the prompt's end, budget the fewest keys that keep this "
        "share of the accumulated score in every layer and KV head (scoring policies)",
        gt=0.0,
        le=1.0,
    )
    kv_max_tokens: int | None = _setting(None, "cap on the budget in tokens, if any", ge=1)
    kv_min_tokens: int = _setting(
        128, "floor on the budget in tokens: a sequence under it never evicts", ge=0
    )
    recent_ratio: float = _setting(
        0.3, "share of the budget kept for the newest tokens", ge=0.0, le=1.0
    )
    sink_tokens: int = _setting(4, "streaming: first tokens always kept (attention sinks)", ge=0)
    tau_init: float = _setting(
        1.0, "keyformer: Gumbel temperature at the first generated token", gt=0.0
    )
    tau_end: float = _setting(
        2.0, "keyformer: Gumbel temperature at max_tokens (rising linearly)", gt=0.0
    )
    score_window: int | None = _setting(
        None,
        "h2o, keyformer, snapkv: only the last w queries before each prompt cut add to "
        f"the prompt's scores (an observation window); none: every query (snapkv: "
        f"{SNAPKV_WINDOW})",
        ge=1,
    )
    snapkv_kernel: int = _setting(
        7, "snapkv: a key's window score is pooled over this many neighbours (1: none)", ge=1
    )
    snapkv_pooling: str = _setting(
        "max", "snapkv: how the neighbours' scores are pooled", choices=POOLING_NAMES
    )
    decode_scoring: str = _setting(
        "accumulate",
        "h2o, keyformer, snapkv: accumulate adds each generated token's attention to the "
        "scores; frozen keeps the prompt's ranking (generated tokens leave first)",
        choices=DECODE_SCORING_NAMES,
    )
    # NOTE: preempt by default: squeezing changes a request's output with the
    # load beside it, and a vLLM user expects the quality they asked for
    # unless they ask otherwise; preemption only costs time.
    kv_pressure: str = _setting(
        "preempt",
        "when the KV pool is full: squeeze lowers this evicting sequence's budget "
        "(never below kv_min_tokens) before anything is preempted, and to admit "
        "waiting requests; preempt keeps its budget",
        choices=PRESSURE_NAMES,
    )
    # NOTE: a floor relative to the budget, beside kv_min_tokens, because one
    # absolute floor cannot suit every prompt length: 64 tokens kept 512-token
    # summaries close to their unsqueezed quality but cost a 3,000-token one
    # most of it (bench/results/pressure).
    kv_squeeze_min_ratio: float = _setting(
        0.0,
        "squeeze: never lower the budget below this share of the budget asked "
        "(nor below kv_min_tokens); 0: kv_min_tokens alone",
        ge=0.0,
        le=1.0,
    )

    def __post_init__(self) -> None:
        for name in KV_POLICY_FIELDS:
            check_kv_setting(name, getattr(self, name))
        check_budget_rule(self.kv_policy, self.kv_target_mass)

    @property
    def evicts(self) -> bool:
        return self.kv_policy != "full"

    @property
    def chooses_budget(self) -> bool:
        """Whether the budget is chosen from kv_target_mass at the prompt's end
        (full ignores the target: it keeps every key)."""
        return self.evicts and self.kv_target_mass is not None

    def budget(self, prompt_len: int) -> int | None:
        """Slots the sequence keeps (k), or None for no eviction. With
        kv_target_mass: the most the choice at the prompt's end can give (every
        prompt key, floored and capped), which admission and the mid-prompt
        cuts go by until then."""
        if not self.evicts:
            return None
        if self.chooses_budget:
            return self.clamp_budget(prompt_len)
        return self.clamp_budget(math.floor(prompt_len * self.kv_ratio))

    def clamp_budget(self, keys: int) -> int:
        """`keys` floored by kv_min_tokens, capped by kv_max_tokens, at least 1."""
        k = max(keys, self.kv_min_tokens)
        if self.kv_max_tokens is not None:
            k = min(k, self.kv_max_tokens)
        return max(k, 1)

    def recent_window(self, budget: int) -> int:
        """w = floor(k * recent_ratio): the newest tokens that are never evicted."""
        return math.floor(budget * self.recent_ratio)

    def score_window_size(self) -> int | None:
        """The observation window w in queries (None: every prompt query scores)."""
        if self.score_window is None and self.kv_policy == "snapkv":
            return SNAPKV_WINDOW
        return self.score_window

    def window_start(
        self, prompt_len: int, budget: int | None, chunk_start: int, prefill_chunk: int
    ) -> int:
        """The first query position whose attention adds to the scores, for a
        prompt chunk starting at `chunk_start` (0: every query scores).

        With an observation window w, the rows that score are the last w
        before the cut that ends the chunk's stretch of the prompt: the next
        multiple of `prefill_chunk` at which the sequence is over its budget
        (the mid-prompt cuts), or the prompt's end. Without a cut there (a
        prompt within its budget) that is the prompt's end too, before the
        generated tokens' cuts. Chunks the batch ended early share their
        stretch's window, so the scores do not depend on the batching."""
        w = self.score_window_size()
        if w is None or chunk_start >= prompt_len:
            return 0
        end = prompt_len
        if budget is not None and prompt_len > budget:
            next_multiple = (chunk_start // prefill_chunk + 1) * prefill_chunk
            first_cut = (budget // prefill_chunk + 1) * prefill_chunk
            end = min(prompt_len, max(next_multiple, first_cut))
        return max(0, end - w)

    def with_overrides(self, **overrides: Any) -> "KVPolicySettings":
        """A copy with the non-None `overrides` applied (and validated).

        A request's own budget rule wins over a default kv_target_mass: one
        that gives kv_ratio, or a position-only policy without a target of its
        own, gets its budget from kv_ratio."""
        unknown = sorted(set(overrides) - set(KV_POLICY_FIELDS))
        if unknown:
            raise ValueError(f"unknown KV policy settings: {unknown}")
        given = {k: v for k, v in overrides.items() if v is not None}
        check_one_budget_rule(given)
        if "kv_target_mass" not in given and (
            "kv_ratio" in given or given.get("kv_policy") in POSITION_POLICIES
        ):
            given["kv_target_mass"] = None
        return replace(self, **given)


# The KV fields, as every layer above spells them (engine config,
# SamplingParams, the HTTP body, the CLI's --kv-* flags).
KV_POLICY_FIELDS = tuple(f.name for f in fields(KVPolicySettings))

_KIND_NAMES = {str: "a string", int: "an integer", float: "a number"}


@dataclass(frozen=True)
class KVSetting:
    """One KV setting, read off its KVPolicySettings field: what a flag, a
    request field or a config key for it needs."""

    name: str
    kind: type  # the value's type: str, int or float
    nullable: bool  # None is a value of its own (kv_max_tokens: no cap)
    default: Any
    help: str
    limits: Limits

    def check(self, value: Any) -> None:
        """Raise a ValueError that starts with the setting's name (the server
        turns that word into the 400's `param`) unless `value` is valid."""
        if value is None and self.nullable:
            return
        if not _is_kind(value, self.kind):
            raise ValueError(f"{self.name} must be {_KIND_NAMES[self.kind]}, got {value!r}")
        if not self.limits.allows(value):
            raise ValueError(f"{self.name} must be {self.limits.rule()}, got {value!r}")


def _is_kind(value: Any, kind: type) -> bool:
    # numbers.*: numpy scalars count; bool is an int to Python, never a setting here.
    if isinstance(value, bool):
        return False
    if kind is int:
        return isinstance(value, numbers.Integral)
    if kind is float:
        return isinstance(value, numbers.Real)
    return isinstance(value, kind)


def _describe(f: Any) -> KVSetting:
    members = get_args(f.type) or (f.type,)
    (kind,) = [m for m in members if m is not type(None)]
    return KVSetting(
        name=f.name,
        kind=kind,
        nullable=type(None) in members,
        default=f.default,
        help=f.metadata["help"],
        limits=f.metadata["limits"],
    )


KV_SETTINGS = tuple(_describe(f) for f in fields(KVPolicySettings))
_BY_NAME = {s.name: s for s in KV_SETTINGS}


def check_kv_setting(name: str, value: Any) -> None:
    """Raise a ValueError naming `name` unless `value` is valid for that setting."""
    _BY_NAME[name].check(value)


def check_one_budget_rule(given: dict[str, Any]) -> None:
    """A request sets its budget by kv_ratio or by kv_target_mass, not both."""
    if given.get("kv_target_mass") is not None and given.get("kv_ratio") is not None:
        raise ValueError(
            "kv_target_mass and kv_ratio both set the budget: give one of them, not both"
        )


def check_budget_rule(policy: str | None, target_mass: float | None) -> None:
    """A kv_target_mass needs scores to weigh: window and streaming have none
    (a ValueError naming kv_target_mass, a 400 in the server)."""
    if target_mass is not None and policy in POSITION_POLICIES:
        raise ValueError(
            f"kv_target_mass needs a policy that scores keys; {policy} keeps keys by "
            "position only: give kv_ratio instead"
        )


# -- the fields, derived for the layers above ---------------------------------

_C = TypeVar("_C", bound=type)


def _with_kv_fields(optional: bool) -> Callable[[_C], _C]:
    """Add every KVPolicySettings field to a class before @dataclass reads it:
    as declared (type and default), or optional with default None."""

    def add(cls: _C) -> _C:
        annotations = dict(cls.__dict__.get("__annotations__", {}))
        for f in fields(KVPolicySettings):
            annotations[f.name] = f.type | None if optional else f.type
            default = None if optional else f.default
            setattr(cls, f.name, field(default=default, metadata=f.metadata))
        cls.__annotations__ = annotations
        return cls

    return add


@dataclass(kw_only=True)
@_with_kv_fields(optional=True)
class KVPolicyOverrides:
    """Every KV setting, None where a request takes the engine's default.

    A base for per-request params (SamplingParams): the fields are keyword-only,
    so they never shift the positions of the subclass's own fields. A value that
    is set is checked at once, by the setting's own rule.
    """

    def __post_init__(self) -> None:
        given = self.kv_overrides()
        for name, value in given.items():
            check_kv_setting(name, value)
        check_one_budget_rule(given)
        check_budget_rule(given.get("kv_policy"), given.get("kv_target_mass"))

    def kv_overrides(self) -> dict[str, Any]:
        """The KV settings this request sets."""
        return {n: getattr(self, n) for n in KV_POLICY_FIELDS if getattr(self, n) is not None}


@dataclass(kw_only=True)
@_with_kv_fields(optional=False)
class KVPolicyDefaults:
    """Every KV setting with its default, as flat fields (the config's keys).

    A base for a mutable config (EngineConfig); keyword-only, like
    KVPolicyOverrides. Validated on construction.
    """

    def __post_init__(self) -> None:
        self.kv_policy_settings()

    def kv_policy_settings(self) -> KVPolicySettings:
        """These defaults, validated (requests may override each field)."""
        return KVPolicySettings(**{n: getattr(self, n) for n in KV_POLICY_FIELDS})
