"""Tables (markdown), raw scores (CSV/JSON) and score-vs-budget plots (PNG)."""

import csv
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.accuracy.common import Score
from bench.provenance import write_json

Key = tuple[str, float, str, str, str]  # policy, budget, task, subtask, metric
PLOTTED = {"summarization": ("rouge1", "rouge2", "rougeL"), "fewshot": ("accuracy",)}


def cpu_line(cpu: dict[str, Any]) -> str:
    """bench.provenance.cpu_description() as one line: "AMD EPYC (avx2 avx512f)"."""
    return f"{cpu.get('cpu_model') or 'unknown CPU'} ({' '.join(cpu.get('cpu_isa') or []) or '-'})"


def aggregate(scores: Sequence[Score]) -> dict[Key, tuple[float, int]]:
    """Mean and count of each metric per (policy, budget, task, subtask)."""
    groups: dict[Key, list[float]] = defaultdict(list)
    for s in scores:
        groups[(s.policy, s.budget, s.task, s.subtask, s.metric)].append(s.value)
    return {k: (sum(v) / len(v), len(v)) for k, v in groups.items()}


def _columns(agg: dict[Key, tuple[float, int]], task: str) -> list[tuple[str, str]]:
    return sorted({(k[3], k[4]) for k in agg if k[2] == task})


def _rows(agg: dict[Key, tuple[float, int]]) -> list[tuple[str, float]]:
    return sorted({(k[0], k[1]) for k in agg}, key=lambda r: (r[0] != "full", r[0], r[1]))


def task_table(agg: dict[Key, tuple[float, int]], task: str) -> str:
    """A markdown table: one row per (policy, budget), a column per subtask/metric."""
    cols = _columns(agg, task)
    head = "| policy | budget | " + " | ".join(f"{s} {m}" for s, m in cols) + " |"
    lines = [head, "|---|---:|" + "---:|" * len(cols)]
    for policy, budget in _rows(agg):
        cells = []
        for sub, metric in cols:
            value = agg.get((policy, budget, task, sub, metric))
            cells.append("" if value is None else f"{value[0]:.3f}")
        lines.append(f"| {policy} | {budget:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(agg: dict[Key, tuple[float, int]], meta: dict[str, Any]) -> str:
    parts = ["# KV policy accuracy", "", f"Command: `{meta['command']}`", ""]
    parts += [f"- {k}: {v}" for k, v in meta["summary"].items()]
    for task in sorted({k[2] for k in agg}):
        counts = sorted({(k[3], v[1]) for k, v in agg.items() if k[2] == task})
        n = ", ".join(f"{s}: {c}" for s, c in dict(counts).items())
        parts += ["", f"## {task}", "", f"Items: {n}.", "", task_table(agg, task)]
    return "\n".join(parts) + "\n"


def write_csv(path: Path, scores: Sequence[Score]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(Score.__dataclass_fields__))
        writer.writeheader()
        writer.writerows(asdict(s) for s in scores)


def write_summary_csv(path: Path, agg: dict[Key, tuple[float, int]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["policy", "budget", "task", "subtask", "metric", "mean", "n"])
        for k, (mean, n) in sorted(agg.items()):
            writer.writerow([*k, f"{mean:.6f}", n])


def _plot_one(agg: dict[Key, tuple[float, int]], task: str, sub: str, metric: str, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for policy in sorted({k[0] for k in agg if k[2:] == (task, sub, metric)}):
        pts = sorted(
            (_x(agg, k), v[0])
            for k, v in agg.items()
            if k[0] == policy and k[2:] == (task, sub, metric)
        )
        if policy == "full":
            ax.axhline(pts[0][1], color="black", linestyle="--", label="full")
        else:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=policy)
    ax.set(xlabel="KV budget (fraction of prompt)", ylabel=metric, title=f"{task} {sub}")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _x(agg: dict[Key, tuple[float, int]], key: Key) -> float:
    """A point's budget as a fraction of the prompt: a kv_target_mass row's
    is the mean fraction its items kept (its kept_fraction), not its target."""
    kept = agg.get((*key[:4], "kept_fraction"))
    return key[1] if kept is None else kept[0]


def plots(agg: dict[Key, tuple[float, int]], out: Path) -> list[Path]:
    """One PNG per (task, subtask, plotted metric); none when matplotlib is absent."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib not installed: no plots (pip install -e '.[bench]')")
        return []
    made = []
    for task, sub, metric in sorted({k[2:] for k in agg}):
        if metric in PLOTTED.get(task, ("accuracy",)):
            path = out / f"{task}_{sub}_{metric}.png"
            _plot_one(agg, task, sub, metric, path)
            made.append(path)
    return made


def write_all(out: Path, scores: Sequence[Score], meta: dict[str, Any]) -> dict[str, Path]:
    """results.md, scores.csv (per item), summary.csv, results.json, *.png."""
    out.mkdir(parents=True, exist_ok=True)
    agg = aggregate(scores)
    paths = {
        "markdown": out / "results.md",
        "scores": out / "scores.csv",
        "summary": out / "summary.csv",
        "json": out / "results.json",
    }
    paths["markdown"].write_text(markdown(agg, meta))
    write_csv(paths["scores"], scores)
    write_summary_csv(paths["summary"], agg)
    table = [
        {
            "policy": k[0],
            "budget": k[1],
            "task": k[2],
            "subtask": k[3],
            "metric": k[4],
            "mean": v[0],
            "n": v[1],
        }
        for k, v in sorted(agg.items())
    ]
    payload = {**meta, "summary_table": table, "scores": [asdict(s) for s in scores]}
    write_json(paths["json"], payload, indent=1)
    for p in plots(agg, out):
        paths[p.stem] = p
    return paths
