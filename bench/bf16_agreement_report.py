"""The numbers and the report of bench/bf16_agreement.py: tokens until the first
divergence per prompt and pair of runs, their median and minimum, written as
markdown and JSON."""

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.eviction_engine import matching_prefix
from bench.provenance import describe, write_json


@dataclass
class Case:
    """One prompt: `prompt_set` is "short" or "long", `source` where it came from."""

    name: str
    prompt_set: str
    source: str
    token_ids: list[int]
    new_tokens: int


@dataclass
class Generation:
    """One run's greedy output for one case. margins[i]: the gap between the
    top two log-probabilities at generated token i (how close a call it was);
    runner_up[i]: the second choice there (a divergence where each side's
    pick is the other's runner-up is a near-tie broken the other way)."""

    tokens: list[int]
    margins: list[float] = field(default_factory=list)
    runner_up: list[int] = field(default_factory=list)
    seconds: float = 0.0


# (run a, run b, what the pair shows); the first is the agreement asked for.
PAIRS = (
    ("keyserve-bf16", "transformers-bf16", "keyserve bf16 vs transformers bf16"),
    ("keyserve-f32", "transformers-f32", "control: keyserve f32 vs transformers f32"),
    ("keyserve-bf16", "keyserve-f32", "what bf16 moves in keyserve"),
    ("transformers-bf16", "transformers-f32", "what bf16 moves in transformers"),
)


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int:
    """Tokens until the first divergence: how many leading tokens a and b share
    (len of the shorter when one is a prefix of the other)."""
    return matching_prefix(a, b)


def summarize(agreed: Sequence[int], lengths: Sequence[int]) -> dict[str, Any]:
    """{prompts, full (how many agree on all their tokens), median, min} of the
    per-prompt first-divergence counts `agreed` out of `lengths` tokens."""
    if len(agreed) != len(lengths):
        raise ValueError("one length per count")
    if not agreed:
        return {"prompts": 0, "full": 0, "median": None, "min": None}
    return {
        "prompts": len(agreed),
        "full": sum(a >= n for a, n in zip(agreed, lengths, strict=True)),
        "median": statistics.median(agreed),
        "min": min(agreed),
    }


def _margin_at(gen: Generation, i: int) -> float | None:
    return round(gen.margins[i], 4) if i < len(gen.margins) else None


def swapped(a: Generation, b: Generation, i: int) -> bool:
    """At token i, each side picked the other's runner-up: the same two
    candidates, ordered the other way."""
    if i >= min(len(a.tokens), len(b.tokens), len(a.runner_up), len(b.runner_up)):
        return False
    return a.tokens[i] == b.runner_up[i] and b.tokens[i] == a.runner_up[i]


def compare(
    cases: Sequence[Case], runs: Mapping[str, Sequence[Generation]]
) -> dict[str, dict[str, Any]]:
    """Per pair (present in `runs`): per-case first divergence with both sides'
    top-2 margins at it, and a summary per prompt set."""
    out: dict[str, dict[str, Any]] = {}
    for a, b, what in PAIRS:
        if a not in runs or b not in runs:
            continue
        rows = []
        for case, ga, gb in zip(cases, runs[a], runs[b], strict=True):
            at = first_divergence(ga.tokens, gb.tokens)
            rows.append(
                {
                    "case": case.name,
                    "set": case.prompt_set,
                    "new_tokens": case.new_tokens,
                    "first_divergence": at,
                    "margin_a": _margin_at(ga, at),
                    "margin_b": _margin_at(gb, at),
                    "swapped": swapped(ga, gb, at),
                }
            )
        sets = sorted({c.prompt_set for c in cases}, reverse=True)  # short, long
        summary = {
            s: summarize(
                [r["first_divergence"] for r in rows if r["set"] == s],
                [r["new_tokens"] for r in rows if r["set"] == s],
            )
            for s in sets
        }
        out[f"{a} vs {b}"] = {"what": what, "a": a, "b": b, "cases": rows, "summary": summary}
    return out


def _summary_table(pairs: Mapping[str, dict[str, Any]]) -> list[str]:
    lines = [
        "| pair | prompts | agree fully | median tokens to first divergence | min |",
        "|---|---|---:|---:|---:|",
    ]
    for pair in pairs.values():
        for s, row in pair["summary"].items():
            lines.append(
                f"| {pair['what']} | {row['prompts']} {s} | {row['full']}/{row['prompts']} "
                f"| {row['median']} | {row['min']} |"
            )
    return lines


def _case_table(cases: Sequence[Case], pairs: Mapping[str, dict[str, Any]]) -> list[str]:
    names = list(pairs)
    head = "| prompt | set | prompt tokens | new | " + " | ".join(names) + " |"
    lines = [head, "|---|---|---:|---:|" + "---:|" * len(names)]
    for i, case in enumerate(cases):
        cells = []
        for name in names:
            row = pairs[name]["cases"][i]
            at = row["first_divergence"]
            swap = ", swap" if row["swapped"] else ""
            margins = f"{row['margin_a']}/{row['margin_b']}{swap}"
            cells.append("all" if at >= case.new_tokens else f"{at} ({margins})")
        lines.append(
            f"| {case.name} | {case.prompt_set} | {len(case.token_ids)} | {case.new_tokens} | "
            + " | ".join(cells)
            + " |"
        )
    return lines


def _seconds_line(meta: Mapping[str, Any]) -> list[str]:
    runs = meta.get("seconds_per_run")
    if not runs:
        return []
    cells = ", ".join(f"{label} {s} s" for label, s in runs.items())
    return [f"Wall time per run (model load included): {cells}.", ""]


def markdown(meta: Mapping[str, Any], cases: Sequence[Case], pairs: Mapping[str, Any]) -> str:
    cpu = meta["cpu"]
    lines = [
        "# Greedy agreement in bfloat16: keyserve against transformers on the CPU",
        "",
        f"Command: `{meta['command']}`  ",
        f"Date (UTC): {meta['date_utc']}; commit: {describe(meta['provenance'])}  ",
        f"CPU: {cpu['cpu_model']}, {meta['threads']} threads; "
        f"flags: {' '.join(cpu['cpu_isa'] or []) or 'unknown'}  ",
        f"torch {meta['torch']}, transformers {meta['transformers']}",
        "",
        meta["workload"],
        "",
        *_seconds_line(meta),
        "Tokens until the first divergence: how many leading generated tokens the",
        "two runs share ('all' = every one of them). Beside a divergence, in",
        "brackets: each side's log-probability of its pick minus that of its",
        "runner-up at that token (a: the pair's first run), i.e. how near a tie",
        "the call was; 'swap': each side's pick was the other's runner-up.",
        "",
        *_summary_table(pairs),
        "",
        *_case_table(cases, pairs),
        "",
    ]
    return "\n".join(lines)


def write(
    out_dir: Path,
    name: str,
    meta: Mapping[str, Any],
    cases: Sequence[Case],
    runs: Mapping[str, Sequence[Generation]],
) -> dict[str, Path]:
    """`<name>.json` (everything, tokens included) and `<name>.md` in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs = compare(cases, runs)
    payload = {
        **meta,
        "cases": [{k: v for k, v in asdict(c).items()} for c in cases],
        "runs": {label: [asdict(g) for g in gens] for label, gens in runs.items()},
        "pairs": pairs,
    }
    paths = {"json": out_dir / f"{name}.json", "markdown": out_dir / f"{name}.md"}
    write_json(paths["json"], payload)
    paths["markdown"].write_text(markdown(meta, cases, pairs), encoding="utf-8")
    return paths
