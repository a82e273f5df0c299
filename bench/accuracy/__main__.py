"""python -m bench.accuracy: quality each KV policy keeps, per budget, on real text."""

import argparse
import json
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench.accuracy import fewshot, report, resume, retrieval, runner, sotu, summarization
from bench.accuracy.common import Item
from bench.provenance import cpu_description, git_provenance

TASKS = ("summarization", "fewshot", "retrieval")
POLICIES = ("full", "window", "streaming", "h2o", "keyformer", "snapkv")
# Items per subtask when --limit is not given (the full run).
DEFAULT_LIMITS = {"summarization": 60, "sotu": 10, "fewshot": 200, "retrieval": 2}
DTYPES = ("float32", "bfloat16", "auto")


def _csv(kind: type) -> Any:
    return lambda s: [kind(x) for x in s.split(",") if x.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.accuracy", description=__doc__)
    p.add_argument(
        "--model", default="default", help="model folder or .gguf; 'default': embedded SmolLM2"
    )
    p.add_argument(
        "--policies",
        type=_csv(str),
        default=list(POLICIES),
        help="policies to run, each with options after +: wN score_window N (the "
        "prompt scored by its last N queries), kN snapkv_kernel N, avg snapkv_pooling avg, "
        "frozen decode_scoring frozen; e.g. keyformer+w32, snapkv+frozen, snapkv+k1",
    )
    p.add_argument("--budgets", type=_csv(float), default=[0.2, 0.3, 0.5, 0.7, 0.9])
    p.add_argument(
        "--kv-target-mass",
        type=_csv(float),
        default=[],
        help="also run every policy that scores keys (h2o, keyformer) with each of these "
        "kv_target_mass values instead of a ratio, e.g. 0.9,0.95,0.99: rows 'h2o+mass' at "
        "the target, with each item's chosen budget as its kept_fraction",
    )
    p.add_argument("--tasks", type=_csv(str), default=list(TASKS))
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        help="items per subtask (retrieval: per length x depth); default: the full run",
    )
    p.add_argument("--fewshot-tasks", type=_csv(str), default=list(fewshot.DEFAULT_TASKS))
    p.add_argument(
        "--lengths",
        type=_csv(int),
        default=[2048, 4096, 7168],
        help="retrieval prompt lengths in tokens",
    )
    p.add_argument("--depths", type=_csv(int), default=[0, 25, 50, 75, 100])
    p.add_argument("--summary-tokens", type=int, default=128)
    p.add_argument(
        "--sotu",
        choices=("auto", "off"),
        default="auto",
        help="long-context summarization on SOTU speeches when the npm package is found",
    )
    p.add_argument("--sotu-tokens", type=int, default=3000, help="SOTU speeches cut to about this")
    p.add_argument("--out", type=Path, default=Path("bench/results/accuracy"))
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the results already in --out and run only the items they lack "
        "(grow a sample over several sittings: rerun with a larger --limit)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="weights, activations and KV cache (passed to LLM(dtype=...)); float32 by "
        "default, the dtype of the committed results; auto: the engine's choice, bfloat16 "
        "on a GPU and on a CPU with AVX-512-BF16 or AMX, float32 elsewhere. The dtype "
        "that ran is recorded in results.json/md",
    )
    p.add_argument("--kv-cache-bytes", default="4GiB")
    p.add_argument("--kv-cache-blocks", type=int, help="KV pool in blocks (wins over bytes)")
    p.add_argument(
        "--kv-pressure",
        choices=("preempt", "squeeze"),
        default="preempt",
        help="evicting runs' kv_pressure: with a pool too small for the batch, "
        "squeeze measures the quality squeezed sequences keep",
    )
    p.add_argument(
        "--kv-min-tokens", type=int, default=0, help="evicting runs' kv_min_tokens (squeeze floor)"
    )
    p.add_argument(
        "--kv-squeeze-min-ratio",
        type=float,
        default=0.0,
        help="evicting runs' kv_squeeze_min_ratio (a squeeze's floor as a share of the budget)",
    )
    p.add_argument(
        "--kv-max-tokens",
        type=int,
        default=None,
        help="evicting runs' kv_max_tokens: a budget in tokens (with --budgets 1.0, "
        "exactly that many for every prompt longer)",
    )
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=2048,
        help="prefill chunk: evicting prompts are cut to their budget after every chunk "
        "(compressed while prefilling); a value >= the longest prompt cuts once, after "
        "the whole prefill (needs a pool that holds the whole prompt)",
    )
    args = p.parse_args(argv)
    bad = set(args.tasks) - set(TASKS) or {
        p for p in args.policies if not runner.valid_policy_label(p, POLICIES)
    }
    if bad or not all(0 < b <= 1 for b in [*args.budgets, *args.kv_target_mass]):
        p.error(f"unknown task/policy {sorted(bad)} or a budget or target outside (0, 1]")
    return args


def _limit(args: argparse.Namespace, name: str) -> int:
    return args.limit if args.limit is not None else DEFAULT_LIMITS[name]


def _summarization_items(args: argparse.Namespace, tok: Any) -> list[Item]:
    made = summarization.lee_items(tok, _limit(args, "summarization"), args.summary_tokens)
    if args.sotu == "off":
        return made
    speeches = sotu.load_speeches()
    if speeches is None:
        print(f"skipping the SOTU summarization variant: {sotu.MISSING}", file=sys.stderr)
        return made
    limit = min(_limit(args, "sotu"), _limit(args, "summarization"))
    return made + summarization.sotu_items(
        tok, speeches, limit, args.sotu_tokens, args.summary_tokens
    )


def _retrieval_items(args: argparse.Namespace, tok: Any, max_len: int) -> list[Item]:
    lengths = [n for n in args.lengths if n + retrieval.MAX_TOKENS < max_len]
    for n in sorted(set(args.lengths) - set(lengths)):
        print(f"skipping retrieval length {n}: the model's context is {max_len}", file=sys.stderr)
    return retrieval.items(tok, lengths, args.depths, _limit(args, "retrieval"))


def build_items(args: argparse.Namespace, tok: Any, max_len: int) -> list[Item]:
    made: list[Item] = []
    if "summarization" in args.tasks:
        made += _summarization_items(args, tok)
    if "fewshot" in args.tasks:
        for task in args.fewshot_tasks:
            made += fewshot.items(task, _limit(args, "fewshot"))
    if "retrieval" in args.tasks:
        made += _retrieval_items(args, tok, max_len)
    return made


def load_llm(args: argparse.Namespace) -> Any:
    import torch

    from engine import LLM

    if args.threads:
        torch.set_num_threads(args.threads)
    model = None if args.model == "default" else args.model
    return LLM(
        model=model,
        dtype=args.dtype,
        kv_cache_bytes=args.kv_cache_bytes,
        kv_cache_blocks=args.kv_cache_blocks,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
    )


def dtype_that_runs(llm: Any, requested: str) -> str:
    """The engine's dtype ("bfloat16", not "auto"); the requested one when the
    llm does not say (an injected fake)."""
    dtype = getattr(getattr(llm, "engine", None), "dtype", None)
    return requested if dtype is None else str(dtype).removeprefix("torch.")


def _git_commit() -> str:
    """The commit of the code that runs (this checkout), "+dirty" when it has
    uncommitted changes ("" outside git); read at the start, since a long run
    may outlive later commits (results.json gets the same, as git_commit and
    git_dirty)."""
    provenance = git_provenance()
    commit = provenance["git_commit"] or ""
    return commit + ("+dirty" if commit and provenance["git_dirty"] else "")


def _meta(
    args: argparse.Namespace,
    items: list[Item],
    result: runner.RunResult,
    wall: float,
    commit: str,
    dtype: str,
) -> dict:
    argv = (
        ["python", "-m", "bench.accuracy", *sys.argv[1:]] if args.command is None else args.command
    )
    lengths = list(result.prompt_tokens.values())
    mean = sum(lengths) / len(lengths)
    return {
        "command": shlex.join(argv),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "summary": {
            "items": len(items),
            "prompt tokens (min/mean/max)": f"{min(lengths)}/{mean:.0f}/{max(lengths)}",
            "wall time (s)": round(wall, 1),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "git commit": commit,
            "dtype": dtype,
            "machine": f"{platform.machine()}, {platform.python_version()}",
            "cpu": report.cpu_line(cpu_description()),
        },
        "seconds_per_run": {f"{p}@{b}": round(s, 2) for (p, b), s in result.seconds.items()},
        "generated_tokens_per_run": {
            f"{p}@{b}": n for (p, b), n in result.generated_tokens.items()
        },
        "squeezed_sequences_per_run": {f"{p}@{b}": n for (p, b), n in result.squeezed.items()},
        "peak_kv_blocks_per_run": {f"{p}@{b}": n for (p, b), n in result.peak_blocks.items()},
        "median_prefill_seconds_per_run": {
            f"{p}@{b}": round(s, 3) for (p, b), s in result.median_prefill_seconds.items()
        },
        "prompt_tokens": result.prompt_tokens,
        # kv_target_mass runs: the budget each item chose, in tokens.
        "kv_budget_tokens_per_run": {f"{p}@{b}": c for (p, b), c in result.kv_budgets.items()},
        "generations": {f"{p}@{b}": o for (p, b), o in result.outputs.items()},
        "items": [{"key": it.key, "gold": it.gold, "meta": it.meta} for it in items],
    }


SCORERS = {
    "summarization": summarization.score,
    "fewshot": fewshot.score,
    "retrieval": retrieval.score,
}


def main(argv: Sequence[str] | None = None, llm: Any = None) -> dict[str, Path]:
    """Run the harness; `llm` may be injected (tests), else the model is loaded."""
    start = time.perf_counter()
    commit = _git_commit()
    args = parse_args(argv)
    args.command = None if argv is None else ["python", "-m", "bench.accuracy", *argv]
    llm = llm if llm is not None else load_llm(args)
    max_len = getattr(getattr(llm, "engine", None), "max_model_len", 8192)
    items = build_items(args, llm.get_tokenizer(), max_len)
    configs = runner.configs(args.policies, args.budgets, args.kv_target_mass)
    dtype = dtype_that_runs(llm, args.dtype)
    previous = resume.load(args.out) if args.resume else None
    if previous is not None:
        resume.check(previous, configs, dtype)
        items = resume.pending(items, previous)
    if not items:
        raise SystemExit("no items to run")
    kv = runner.KVOptions(
        args.kv_pressure, args.kv_min_tokens, args.kv_max_tokens, args.kv_squeeze_min_ratio
    )
    result = runner.run(llm, items, configs, kv)
    scores = runner.score_all(items, result, SCORERS)
    stats = getattr(getattr(llm, "engine", None), "stats", None)
    meta = _meta(args, items, result, time.perf_counter() - start, commit, dtype)
    if stats is not None:
        meta["engine_stats"] = stats()
        if meta["engine_stats"].get("preemptions"):
            print("warning: requests were preempted; raise --kv-cache-bytes", file=sys.stderr)
    if previous is not None:
        scores, meta = resume.merge(previous, scores, meta)
    paths = report.write_all(args.out, scores, meta)
    print(paths["markdown"].read_text())
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=1), file=sys.stderr)
    return paths


if __name__ == "__main__":
    main()
