"""python -m bench.accuracy.dtype_report: what a dtype costs, beside what eviction costs.

Compares the harness's results in one dtype (--run, e.g. a bfloat16 rerun)
with its results in another (--reference, e.g. the committed float32 runs),
on the items both hold, per task/subtask and per policy/budget: how often the
run's answer equals the reference's full-cache answer, next to how often the
reference's own policy/budget did (eviction's cost alone) and how often the
run's full cache did (the dtype's cost alone). Writes results.md and
results.json to --out.
"""

import argparse
import shlex
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.accuracy import agreement
from bench.accuracy.report import cpu_line
from bench.provenance import cpu_description, write_json

COLUMNS = (  # (Row field, header; {run}/{ref} are the two dtypes)
    ("run_vs_reference_full", "{run} vs {ref} full"),
    ("reference_vs_reference_full", "{ref} vs {ref} full"),
    ("run_vs_reference_same", "{run} vs {ref}, same policy/budget"),
    ("run_vs_run_full", "{run} vs {run} full"),
    ("run_accuracy", "accuracy {run}"),
    ("reference_accuracy", "accuracy {ref}"),
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.accuracy.dtype_report", description=__doc__)
    p.add_argument(
        "--reference",
        type=Path,
        action="append",
        required=True,
        help="a results folder of the harness (results.json); repeat for several",
    )
    p.add_argument("--run", type=Path, action="append", required=True, help="the same, compared")
    p.add_argument("--out", type=Path, required=True, help="folder for results.md/json")
    return p.parse_args(argv)


def build(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """The report as data: the two sides' provenance, the rows, the full-cache flips."""
    run, reference = agreement.load_side(args.run), agreement.load_side(args.reference)
    if run.dtype == reference.dtype:
        print(f"note: both sides ran in {run.dtype}", file=sys.stderr)
    rows = agreement.compare(run, reference)
    if not rows:
        raise SystemExit("the two sides hold no few-shot or retrieval item in common")
    return {
        "command": command,
        "report_cpu": cpu_line(cpu_description()),
        "run": {"dtype": run.dtype, "folders": run.folders},
        "reference": {"dtype": reference.dtype, "folders": reference.folders},
        "rows": [asdict(r) for r in rows],
        "full_disagreements": agreement.full_disagreements(run, reference),
    }


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def _side_lines(name: str, side: dict[str, Any]) -> list[str]:
    lines = [f"- {name}: {side['dtype']}"]
    for f in side["folders"]:
        lines.append(f"  - `{f['path']}` ({f['dtype']}) at {f['git commit']}; CPU: {f['cpu']}")
        lines += [f"    - `{c}`" for c in f["commands"]]
    return lines


def _table(rows: list[dict[str, Any]], names: dict[str, str]) -> list[str]:
    head = [h.format(**names) for _, h in COLUMNS]
    lines = ["| policy | budget | n | " + " | ".join(head) + " |", "|---|---:|---:|" + "---:|" * 6]
    for r in rows:
        cells = " | ".join(_cell(r[field]) for field, _ in COLUMNS)
        lines.append(f"| {r['policy']} | {r['budget']:g} | {r['n']} | {cells} |")
    return lines


def _legend(names: dict[str, str]) -> list[str]:
    run, ref = names["run"], names["ref"]
    return [
        f"Shares of the items both sides hold. `{run} vs {ref} full`: the answer of this "
        f"policy/budget in {run} equals {ref} full's (the dtype and eviction together); in "
        f"the full row, {run}'s own cost. `{ref} vs {ref} full`: the same policy/budget in "
        f"{ref} (eviction alone, the reference's `agreement`). `{run} vs {ref}, same "
        f"policy/budget`: the two dtypes under the same eviction. `{run} vs {run} full`: "
        f"eviction alone, in {run}. Few-shot answers: the letter / LAMBADA's words "
        "(fewshot.prediction); passkey answers: the key when found, else the first number "
        "written (retrieval.prediction), and accuracy is the passkey accuracy.",
    ]


def markdown(report: dict[str, Any]) -> str:
    names = {"run": report["run"]["dtype"], "ref": report["reference"]["dtype"]}
    parts = [f"# Accuracy across dtypes: {names['run']} against {names['ref']}", ""]
    parts += [f"Command: `{report['command']}`", ""]
    parts += _side_lines("run", report["run"]) + _side_lines("reference", report["reference"])
    parts += [f"- this report written on: {report['report_cpu']}", ""]
    parts += _legend(names)
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in report["rows"]:
        groups.setdefault((r["task"], r["subtask"]), []).append(r)
    for (task, sub), rows in groups.items():
        full = rows[0]["run_vs_reference_full"] if rows[0]["policy"] == "full" else None
        parts += ["", f"## {task} / {sub}", ""]
        if full is not None:
            parts += [f"{names['run']} full against {names['ref']} full: {_cell(full)}.", ""]
        parts += _table(rows, names)
    flips = report["full_disagreements"]
    parts += ["", f"Items whose full-cache answer differs between the dtypes: {len(flips)}."]
    parts += [f"- {f['key']}: {f['run']!r} against {f['reference']!r}" for f in flips[:40]]
    return "\n".join(parts) + "\n"


def write_report(out: Path, report: dict[str, Any]) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "results.md", "json": out / "results.json"}
    paths["markdown"].write_text(markdown(report))
    write_json(paths["json"], report, indent=1)
    return paths


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    args = parse_args(argv)
    words = ["python", "-m", "bench.accuracy.dtype_report"]
    command = shlex.join(words + list(sys.argv[1:] if argv is None else argv))
    paths = write_report(args.out, build(args, command))
    print(paths["markdown"].read_text())
    return paths


if __name__ == "__main__":
    main()
