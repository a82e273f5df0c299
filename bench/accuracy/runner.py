"""Run every (policy, budget) over all items, one `llm.generate` call each."""

import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.accuracy.common import Item, Score
from engine import SamplingParams
from kv_manager.policies.settings import POSITION_POLICIES

Scorer = Callable[[Sequence[Item], dict[str, str], dict[str, str], str, float], list[Score]]
FULL = ("full", 1.0)
# A config whose budget is chosen from kv_target_mass: its policy is labelled
# "h2o+mass" and its budget is the target (0.95), not a fraction of the prompt.
MASS = "+mass"
# Its score rows add the budget each item chose, over the item's prompt tokens.
KEPT_FRACTION = "kept_fraction"


@dataclass
class RunResult:
    outputs: dict[tuple[str, float], dict[str, str]] = field(default_factory=dict)
    seconds: dict[tuple[str, float], float] = field(default_factory=dict)
    prompt_tokens: dict[str, int] = field(default_factory=dict)
    generated_tokens: dict[tuple[str, float], int] = field(default_factory=dict)
    # Sequences squeezed under kv_pressure squeeze (the pool too small for the batch).
    squeezed: dict[tuple[str, float], int] = field(default_factory=dict)
    # The most KV blocks in use during the run (prompts compressed while
    # prefilling hold budget + one chunk, not the whole prompt), and the median
    # seconds from a request's first step to its first token (its prefill).
    peak_blocks: dict[tuple[str, float], int] = field(default_factory=dict)
    median_prefill_seconds: dict[tuple[str, float], float] = field(default_factory=dict)
    # kv_target_mass runs: the budget (tokens) each item's sequence chose.
    kv_budgets: dict[tuple[str, float], dict[str, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class KVOptions:
    """What every evicting run shares: the pressure policy and the floors."""

    pressure: str = "preempt"
    min_tokens: int = 0
    max_tokens: int | None = None  # a cap on the budget in tokens (kv_max_tokens)
    squeeze_min_ratio: float = 0.0  # a squeeze's floor as a share of the budget


def configs(
    policies: Sequence[str], budgets: Sequence[float], masses: Sequence[float] = ()
) -> list[tuple[str, float]]:
    """Full once (budget 1.0), then every other policy at every budget, then
    every policy that scores keys at every kv_target_mass ("h2o+mass", 0.95)."""
    ratios = [(p, b) for p in policies if p != "full" for b in budgets]
    scored = [p for p in policies if p.split("+")[0] not in ("full", *POSITION_POLICIES)]
    return [FULL] + ratios + [(p + MASS, m) for p in scored for m in masses]


# A policy label names a policy and, after "+", options of it (each run's
# results keep the whole label, beside the plain policy's): wN score_window
# N, kN snapkv_kernel N, avg snapkv_pooling avg, frozen decode_scoring
# frozen. "keyformer+w32", "snapkv+w64+frozen", "snapkv+k1".
_FLAGS = {"avg": ("snapkv_pooling", "avg"), "frozen": ("decode_scoring", "frozen")}
_NUMBERS = {"w": "score_window", "k": "snapkv_kernel"}


def policy_fields(label: str) -> dict[str, Any]:
    """The request's KV fields a policy label names (ValueError if unknown)."""
    name, *options = label.split("+")
    fields: dict[str, Any] = {"kv_policy": name}
    for option in options:
        if option in _FLAGS:
            key, value = _FLAGS[option]
            fields[key] = value
        elif option[:1] in _NUMBERS and option[1:].isdigit() and int(option[1:]) > 0:
            fields[_NUMBERS[option[0]]] = int(option[1:])
        else:
            raise ValueError(f"unknown option {option!r} in policy {label!r}")
    return fields


def valid_policy_label(label: str, names: Sequence[str]) -> bool:
    try:
        fields = policy_fields(label)
    except ValueError:
        return False
    return fields["kv_policy"] in names and (len(fields) == 1 or fields["kv_policy"] != "full")


def params(
    item: Item, index: int, policy: str, budget: float, kv: KVOptions = KVOptions()
) -> SamplingParams:
    """Greedy; kv_min_tokens 0 by default so the ratio applies to short
    prompts too (it is also the floor a squeeze stops at); a fixed seed per
    item keeps Keyformer's noise reproducible. A "+mass" policy's budget is
    its kv_target_mass."""
    fields = policy_fields(policy.removesuffix(MASS))
    if policy != "full":
        rule = "kv_target_mass" if policy.endswith(MASS) else "kv_ratio"
        fields.update(
            {rule: budget},
            kv_min_tokens=kv.min_tokens,
            kv_pressure=kv.pressure,
            kv_squeeze_min_ratio=kv.squeeze_min_ratio,
        )
        if kv.max_tokens is not None:
            fields.update(kv_max_tokens=kv.max_tokens)
    return SamplingParams(temperature=0.0, max_tokens=item.max_tokens, seed=index, **fields)


def _record_memory_and_prefill(
    result: RunResult, config: tuple[str, float], engine: Any, outs: Sequence[Any]
) -> None:
    """The run's peak KV blocks and median prefill seconds, where the engine
    and the outputs say (an injected fake may not)."""
    if engine is not None:
        result.peak_blocks[config] = engine.peak_kv_blocks_used
    prefill = [
        m.first_token_time - m.first_scheduled_time
        for m in (getattr(o, "metrics", None) for o in outs)
        if m is not None and m.first_token_time is not None and m.first_scheduled_time is not None
    ]
    if prefill:
        result.median_prefill_seconds[config] = statistics.median(prefill)


def _progress(total: int) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="run", desc="policy x budget")


def run(
    llm: Any, items: Sequence[Item], runs: Iterable[tuple[str, float]], kv: KVOptions = KVOptions()
) -> RunResult:
    """Generate every item under every config; a tqdm bar (or a line per run)."""
    runs = list(runs)
    result = RunResult()
    bar = _progress(len(runs))
    prompts = [item.prompt for item in items]
    for i, (policy, budget) in enumerate(runs):
        if bar is not None:
            bar.set_postfix_str(f"{policy}@{budget} ({len(items)} prompts)")
        engine = getattr(llm, "engine", None)
        if engine is not None:
            engine.peak_kv_blocks_used = 0  # this run's own peak
        start = time.perf_counter()
        outs = llm.generate(
            prompts, [params(it, k, policy, budget, kv) for k, it in enumerate(items)]
        )
        result.seconds[(policy, budget)] = time.perf_counter() - start
        result.outputs[(policy, budget)] = {
            it.key: o.outputs[0].text for it, o in zip(items, outs, strict=True)
        }
        result.generated_tokens[(policy, budget)] = sum(len(o.outputs[0].token_ids) for o in outs)
        _record_memory_and_prefill(result, (policy, budget), engine, outs)
        result.squeezed[(policy, budget)] = sum(
            getattr(getattr(o, "kv", None), "squeezed_budget", None) is not None for o in outs
        )
        for it, o in zip(items, outs, strict=True):
            result.prompt_tokens[it.key] = len(o.prompt_token_ids)
        if policy.endswith(MASS):
            result.kv_budgets[(policy, budget)] = _chosen_budgets(items, outs)
        if bar is not None:
            bar.update(1)
        else:
            print(
                f"[{i + 1}/{len(runs)}] {policy}@{budget}: {result.seconds[(policy, budget)]:.1f}s"
            )
    if bar is not None:
        bar.close()
    return result


def _chosen_budgets(items: Sequence[Item], outs: Sequence[Any]) -> dict[str, int]:
    """The budget each item's sequence chose (usage's kv budget), where the
    outputs say (an injected fake may not)."""
    chosen = {}
    for it, o in zip(items, outs, strict=True):
        budget = getattr(getattr(o, "kv", None), "budget", None)
        if budget is not None:
            chosen[it.key] = budget
    return chosen


def score_all(items: Sequence[Item], result: RunResult, scorers: dict[str, Scorer]) -> list[Score]:
    """Every config's items scored by their task, with full's outputs as the
    reference; kv_target_mass configs also score each item's kept fraction
    (its chosen budget over its prompt tokens, at most 1)."""
    reference = result.outputs[FULL]
    rows: list[Score] = []
    for (policy, budget), outputs in result.outputs.items():
        for task, scorer in scorers.items():
            mine = [it for it in items if it.task == task]
            if mine:
                rows += scorer(mine, outputs, reference, policy, budget)
        chosen = result.kv_budgets.get((policy, budget), {})
        rows += [
            Score(policy, budget, it.task, it.subtask, it.item_id, KEPT_FRACTION,
                  min(1.0, chosen[it.key] / result.prompt_tokens[it.key]))
            for it in items if it.key in chosen and it.task in scorers
        ]  # fmt: skip
    return rows
