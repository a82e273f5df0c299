"""Two sets of the harness's results side by side, item by item: a run (say,
bfloat16) against a reference (float32), on the items both hold.

Answers are read from the generations by the harness's own scoring
(fewshot.prediction and gold_answer, retrieval.prediction), so an agreement
here is the harness's `agreement` metric with another reference, and an
accuracy here is its `accuracy`. Summarization has no answer to agree on and
is left out.
"""

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.accuracy import fewshot, resume, retrieval
from bench.accuracy.common import Item
from bench.accuracy.runner import FULL

Answer = Callable[[Item, str], str]
# task -> (the answer a generation gives, the gold answer)
ANSWERS: dict[str, tuple[Answer, Callable[[Item], str]]] = {
    "fewshot": (fewshot.prediction, fewshot.gold_answer),
    "retrieval": (retrieval.prediction, lambda item: item.gold),
}
FULL_CONFIG = f"{FULL[0]}@{FULL[1]}"


@dataclass
class Side:
    """One side of the comparison: one or more results.json merged."""

    dtype: str
    folders: list[dict[str, Any]]  # path, dtype, commits, commands, CPU of each
    items: dict[str, Item]
    generations: dict[str, dict[str, str]]  # "policy@budget" -> item key -> text


@dataclass
class Row:
    """One (task, subtask, policy, budget): shares of the n items both sides
    hold. None where the reference did not run this policy/budget."""

    task: str
    subtask: str
    policy: str
    budget: float
    n: int
    run_vs_reference_full: float
    reference_vs_reference_full: float | None
    run_vs_reference_same: float | None
    run_vs_run_full: float
    run_accuracy: float
    reference_accuracy: float | None


def _item(row: dict[str, Any]) -> Item:
    task, subtask, item_id = row["key"].split("/", 2)
    return Item(task, subtask, item_id, "", 0, row["gold"], row["meta"])


def _folder(path: Path, data: dict[str, Any]) -> dict[str, Any]:
    parts = data.get("parts") or [data]
    return {
        "path": str(path),
        "dtype": resume.dtype_of(data),
        "git commit": data["summary"]["git commit"],
        "commands": [p["command"] for p in parts],
        "cpu": data["summary"].get("cpu", "not recorded"),
    }


def load_side(folders: Sequence[Path]) -> Side:
    """The results.json of each folder, merged; one dtype and no item twice."""
    side = Side("", [], {}, {})
    for path in folders:
        data = json.loads((Path(path) / "results.json").read_text())
        side.folders.append(_folder(Path(path), data))
        for row in data["items"]:
            if row["key"] in side.items:
                raise SystemExit(f"{path}: item {row['key']} is in another folder of this side")
            side.items[row["key"]] = _item(row)
        for config, outputs in data["generations"].items():
            side.generations.setdefault(config, {}).update(outputs)
    if FULL_CONFIG not in side.generations:
        raise SystemExit(f"{', '.join(map(str, folders))}: no {FULL_CONFIG} run to compare with")
    dtypes = {f["dtype"] for f in side.folders}
    if len(dtypes) != 1:
        raise SystemExit(f"the folders of one side ran in different dtypes: {sorted(dtypes)}")
    side.dtype = dtypes.pop()
    return side


def common_items(run: Side, reference: Side) -> list[Item]:
    """The items both sides hold, of the tasks with an answer; the same key
    must mean the same question (the same gold answer)."""
    made = []
    for key, item in run.items.items():
        other = reference.items.get(key)
        if other is None or item.task not in ANSWERS:
            continue
        if other.gold != item.gold:
            raise SystemExit(f"{key}: gold {item.gold!r} here, {other.gold!r} in the reference")
        made.append(item)
    return made


def share(items: Sequence[Item], a: dict[str, str], b: dict[str, str]) -> float:
    """The share of `items` whose answer in generations `a` equals that in `b`."""
    answer = ANSWERS[items[0].task][0]
    return sum(answer(it, a[it.key]) == answer(it, b[it.key]) for it in items) / len(items)


def accuracy(items: Sequence[Item], outputs: dict[str, str]) -> float:
    answer, gold = ANSWERS[items[0].task]
    return sum(answer(it, outputs[it.key]) == gold(it) for it in items) / len(items)


def _row(items: list[Item], run: Side, reference: Side, config: str) -> Row:
    policy, budget = config.rsplit("@", 1)
    mine, theirs = run.generations[config], reference.generations.get(config)
    ref_full = reference.generations[FULL_CONFIG]
    if theirs is not None and not all(it.key in theirs for it in items):
        theirs = None  # the reference ran this config on other items: not comparable
    return Row(
        task=items[0].task,
        subtask=items[0].subtask,
        policy=policy,
        budget=float(budget),
        n=len(items),
        run_vs_reference_full=share(items, mine, ref_full),
        reference_vs_reference_full=None if theirs is None else share(items, theirs, ref_full),
        run_vs_reference_same=None if theirs is None else share(items, mine, theirs),
        run_vs_run_full=share(items, mine, run.generations[FULL_CONFIG]),
        run_accuracy=accuracy(items, mine),
        reference_accuracy=None if theirs is None else accuracy(items, theirs),
    )


def _order(config: str) -> tuple:
    policy, budget = config.rsplit("@", 1)
    return (policy != FULL[0], policy, float(budget))


def compare(run: Side, reference: Side) -> list[Row]:
    """A row per (task, subtask) and per config the run holds, full first."""
    groups: dict[tuple[str, str], list[Item]] = {}
    for item in common_items(run, reference):
        groups.setdefault((item.task, item.subtask), []).append(item)
    needed = [run.generations[FULL_CONFIG], reference.generations[FULL_CONFIG]]
    rows = []
    for (_task, _sub), items in sorted(groups.items()):
        for config in sorted(run.generations, key=_order):
            outputs = [run.generations[config], *needed]
            here = [it for it in items if all(it.key in o for o in outputs)]
            if here:
                rows.append(_row(here, run, reference, config))
    return rows


def full_disagreements(run: Side, reference: Side) -> list[dict[str, str]]:
    """The items whose full-cache answer differs between the two sides."""
    mine, theirs = run.generations[FULL_CONFIG], reference.generations[FULL_CONFIG]
    made = []
    for item in common_items(run, reference):
        answer = ANSWERS[item.task][0]
        a, b = answer(item, mine[item.key]), answer(item, theirs[item.key])
        if a != b:
            made.append({"key": item.key, "run": a, "reference": b, "gold": item.gold})
    return made
