"""Where a kv_target_mass budget comes from: the keys each layer needs.

A budget chosen from a quality target is the largest, over (layer, KV head),
of the fewest keys whose cut keeps the target share of that head's score
(kv_manager/policies/target_mass.py). This runs prompts through the engine
with kv_target_mass set, records the scores each choice weighs, and reports
per layer the share of the prompt's keys its heads need, the budget the
engine chose, and the budget it would be with layers left out of the max
(`--skip-layers`). One layer whose attention is spread over the whole prompt
decides the budget for all of them.

    python -m bench.mass_profile --policy snapkv --target 0.95 --tasks retrieval \\
        --lengths 4096 --depths 0,50 --limit 1 --dtype bfloat16
"""

import argparse
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

import engine.runtime.budget_choice as budget_choice
from bench.accuracy import fewshot, retrieval, runner
from bench.accuracy.common import Item
from bench.provenance import cpu_description, cpu_line, git_provenance, write_json
from kv_manager.policies.base import EvictionPolicy


@dataclass
class Choice:
    """One budget choice: the keys held, the engine's k, and each (layer,
    head)'s need (its fewest keys that hold the target, to `--steps`)."""

    slots: int
    chosen: int
    needs: torch.Tensor  # [L, H], int64


def head_needs(
    policy: EvictionPolicy,
    scores: torch.Tensor,
    positions: torch.Tensor,
    logical_len: int,
    target: float,
    steps: int,
) -> torch.Tensor:
    """[L, H]: per (layer, head) the smallest k of a grid of `steps` slot
    counts up to every slot whose cut keeps `target` of that head's score
    (an upper bound within slots / steps of the exact need)."""
    weights = scores.double()
    total = weights.sum(-1)
    slots = positions.shape[-1]
    needs = torch.full(total.shape, slots, dtype=torch.long)
    found = torch.zeros(total.shape, dtype=torch.bool)
    for k in sorted({max(1, math.ceil(slots * i / steps)) for i in range(1, steps + 1)}):
        victims = policy.select_victims(scores, positions, k, logical_len)
        holds = total - weights.gather(-1, victims).sum(-1) >= target * total
        needs[holds & ~found] = k
        found |= holds
        if bool(found.all()):
            break
    return needs


@contextmanager
def recorded_choices(steps: int) -> Iterator[list[Choice]]:
    """Within the block, every budget choice the engine makes is recorded
    (with its per-head needs) in the list it yields."""
    choices: list[Choice] = []
    choose = budget_choice.keys_for_mass

    def recorded(policy, scores, positions, logical_len, target):  # noqa: ANN001, ANN202
        chosen = choose(policy, scores, positions, logical_len, target)
        needs = head_needs(policy, scores, positions, logical_len, target, steps)
        choices.append(Choice(positions.shape[-1], chosen, needs))
        return chosen

    budget_choice.keys_for_mass = recorded
    try:
        yield choices
    finally:
        budget_choice.keys_for_mass = choose


def make_items(args: argparse.Namespace, tokenizer: Any) -> list[Item]:
    made: list[Item] = []
    if "retrieval" in args.tasks:
        made += retrieval.items(tokenizer, args.lengths, args.depths, args.limit)
    if "fewshot" in args.tasks:
        for task in args.fewshot_tasks:
            made += fewshot.items(task, args.limit)
    return made


def summarize(items: list[Item], choices: list[Choice], skip: int) -> dict[str, Any]:
    """Per subtask: mean share of keys chosen, the same with the first `skip`
    layers left out of the max, and per layer the mean share its heads need."""
    out: dict[str, Any] = {}
    for subtask in dict.fromkeys(item.subtask for item in items):
        mine = [c for item, c in zip(items, choices, strict=True) if item.subtask == subtask]
        per_layer = torch.stack([c.needs.max(1).values / c.slots for c in mine]).mean(0)
        out[subtask] = {
            "items": len(mine),
            "mean_slots": sum(c.slots for c in mine) / len(mine),
            "chosen_share": sum(c.chosen / c.slots for c in mine) / len(mine),
            "share_without_skipped": sum(int(c.needs[skip:].max()) / c.slots for c in mine)
            / len(mine),
            "layer_share": [round(float(x), 3) for x in per_layer],
        }
    return out


def markdown(args: argparse.Namespace, summary: dict[str, Any]) -> str:
    layers = len(next(iter(summary.values()))["layer_share"])
    lines = [
        "# Keys a kv_target_mass budget needs, per layer",
        "",
        f"Command: `python -m bench.mass_profile {' '.join(args.argv)}`",
        "",
        f"Commit {git_provenance()['git_commit']}; CPU: {cpu_line(cpu_description())}; "
        f"{args.dtype}; policy {args.policy}, target {args.target}.",
        "",
        "Shares of the keys the prompt holds at its end, mean over items. Chosen: "
        "the engine's budget (the max over every layer and head); without skipped: "
        f"the max over the layers after the first {args.skip_layers}.",
        "",
        "| subtask | items | slots | chosen | without skipped | "
        + " | ".join(f"L{i}" for i in range(layers))
        + " |",
        "|---|" + "---:|" * (4 + layers),
    ]
    for subtask, s in summary.items():
        cells = [str(s["items"]), f"{s['mean_slots']:.0f}", f"{s['chosen_share']:.2f}"]
        cells.append(f"{s['share_without_skipped']:.2f}")
        cells += [f"{x:.2f}" for x in s["layer_share"]]
        lines.append(f"| {subtask} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.mass_profile", description=__doc__)
    csv_int = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    p.add_argument("--policy", default="snapkv", help="a scoring policy label, e.g. snapkv+k15")
    p.add_argument("--target", type=float, default=0.95)
    p.add_argument("--tasks", type=lambda s: s.split(","), default=["retrieval"])
    p.add_argument("--lengths", type=csv_int, default=[4096])
    p.add_argument("--depths", type=csv_int, default=[0, 25, 50, 75, 100])
    p.add_argument("--fewshot-tasks", type=lambda s: s.split(","), default=["arc_easy"])
    p.add_argument("--limit", type=int, default=1, help="items per length x depth, or per task")
    p.add_argument("--skip-layers", type=int, default=1)
    p.add_argument("--steps", type=int, default=100, help="grid of slot counts per head")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="folder for mass_profile.md/json")
    args = p.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    from engine import LLM

    if args.threads:
        torch.set_num_threads(args.threads)
    llm = LLM(dtype=args.dtype, max_num_batched_tokens=8192)
    items = make_items(args, llm.get_tokenizer())
    with recorded_choices(args.steps) as choices:
        for index, item in enumerate(items):  # one at a time: choices in item order
            one_token = replace(item, max_tokens=1)
            label = args.policy + runner.MASS
            llm.generate([item.prompt], runner.params(one_token, index, label, args.target))
    summary = summarize(items, choices, args.skip_layers)
    report = markdown(args, summary)
    print(report)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "mass_profile.md").write_text(report)
        write_json(
            args.out / "mass_profile.json",
            {"args": vars(args) | {"out": str(args.out)}, "summary": summary},
        )
    return summary


if __name__ == "__main__":
    main()
