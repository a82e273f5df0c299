"""Grow a run over several sittings: with --resume, the harness reads the
results already in --out, runs only the items they lack, and writes the
union. Each sitting is kept as a part (command, commit, date, items, wall
time), so the record says how the whole was made."""

import json
from pathlib import Path
from typing import Any

from bench.accuracy.common import Item, Score


def load(out: Path) -> dict[str, Any] | None:
    """The earlier results.json in `out`, or None when there is none."""
    path = out / "results.json"
    return json.loads(path.read_text()) if path.is_file() else None


def dtype_of(results: dict[str, Any]) -> str:
    """The dtype a results.json ran in. Results from before --dtype ran in
    float32: the engine's "auto" was float32 on a CPU then."""
    return results["summary"].get("dtype") or results["args"].get("dtype") or "float32"


def check(previous: dict[str, Any], configs: list[tuple[str, float]], dtype: str) -> None:
    """Refuse to mix runs of different (policy, budget) sets, whose merged
    table would have holes, or of different dtypes, whose items would not be
    comparable with one another."""
    before = {tuple(k.rsplit("@", 1)) for k in previous["generations"]}
    now = {(p, str(b)) for p, b in configs}
    if before != now:
        raise SystemExit(
            "--resume: the results in --out ran other policies/budgets "
            f"({sorted(before)}); run with the same --policies and --budgets"
        )
    if dtype_of(previous) != dtype:
        raise SystemExit(
            f"--resume: the results in --out ran in {dtype_of(previous)}, this run in "
            f"{dtype}; run with the same --dtype or another --out"
        )


def pending(items: list[Item], previous: dict[str, Any]) -> list[Item]:
    """The items the earlier results do not have."""
    done = {it["key"] for it in previous["items"]}
    return [it for it in items if it.key not in done]


def _part(meta: dict[str, Any]) -> dict[str, Any]:
    s = meta["summary"]
    return {
        "command": meta["command"],
        "git commit": s["git commit"],
        "date": s["date"],
        "items": s["items"],
        "wall time (s)": s["wall time (s)"],
    }


def _add(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: round(a.get(k, 0) + b.get(k, 0), 2) for k in {**a, **b}}


def merge(
    previous: dict[str, Any], scores: list[Score], meta: dict[str, Any]
) -> tuple[list[Score], dict[str, Any]]:
    """The union of the earlier results and this sitting's (scores, meta)."""
    parts = previous.get("parts") or [_part(previous)]
    parts = [*parts, _part(meta)]
    prompt_tokens = {**previous["prompt_tokens"], **meta["prompt_tokens"]}
    lengths = list(prompt_tokens.values())
    generations = {
        config: {**previous["generations"].get(config, {}), **outputs}
        for config, outputs in meta["generations"].items()
    }
    merged = {
        **meta,
        "parts": parts,
        "summary": {
            **meta["summary"],
            "items": len(prompt_tokens),
            "prompt tokens (min/mean/max)": (
                f"{min(lengths)}/{sum(lengths) / len(lengths):.0f}/{max(lengths)}"
            ),
            "wall time (s)": round(sum(p["wall time (s)"] for p in parts), 1),
            "git commit": ", ".join(dict.fromkeys(p["git commit"] for p in parts)),
            "parts": len(parts),
        },
        "seconds_per_run": _add(previous["seconds_per_run"], meta["seconds_per_run"]),
        "generated_tokens_per_run": _add(
            previous["generated_tokens_per_run"], meta["generated_tokens_per_run"]
        ),
        # Older results have no squeeze counts.
        "squeezed_sequences_per_run": _add(
            previous.get("squeezed_sequences_per_run", {}), meta["squeezed_sequences_per_run"]
        ),
        "prompt_tokens": prompt_tokens,
        "kv_budget_tokens_per_run": {
            config: {**previous.get("kv_budget_tokens_per_run", {}).get(config, {}), **chosen}
            for config, chosen in meta["kv_budget_tokens_per_run"].items()
        },
        "generations": generations,
        "items": [*previous["items"], *meta["items"]],
    }
    earlier = [Score(**row) for row in previous["scores"]]
    return earlier + scores, merged
