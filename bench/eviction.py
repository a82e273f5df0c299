"""Eviction-aware KV memory: what each policy keeps, how long its output stays
full attention's, and how many sequences a fixed pool then holds.

    python -m bench.eviction            # full run (see bench/README.md for what it measures)
    python -m bench.eviction --quick    # smoke run: 2 short prompts, 2 budgets, 8 new tokens

Figures, on the embedded SmolLM2-135M-Instruct (float32, CPU), greedy:

1. attention mass: the share of full attention's probability mass on the
   tokens each policy keeps, per budget (kv_ratio, kv_min_tokens=0), averaged
   over layers, heads, decode steps and prompts (bench/eviction_dense.py);
2. greedy match: leading generated tokens identical to full's greedy output;
3. capacity: peak running sequences and KV blocks at a fixed pool.

Results go to bench/results/eviction/<name>.{json,md,png}.
"""

import argparse
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from bench.eviction_dense import BatchDecode, RunResult, RunSpec, run_prefill
from bench.eviction_engine import (
    FULL,
    Config,
    capacity_run,
    engine_noise,
    greedy_outputs,
    load_llm,
    matching_prefix,
    pool_for,
)
from bench.eviction_report import write_results
from bench.eviction_workload import Prompt, capacity_prompts, summary_prompts
from bench.provenance import git_provenance
from bench.throughput import Progress, load_average, log, machine_info, process_age_s

RESULTS_DIR = Path(__file__).parent / "results" / "eviction"
MAX_NUM_SEQS = 64
POLICIES = ("window", "streaming", "h2o", "keyformer")
FULL_PRESET = {
    "prompts": 8,
    "min_tokens": 1000,
    "max_tokens_prompt": 2000,
    "budgets": [0.2, 0.5, 0.7, 0.9],
    "new_tokens": 64,
    "engine_prompts": 3,
    "capacity_requests": 16,
    "capacity_full_seqs": 4,
    "capacity_prompt_tokens": 1000,
}
QUICK_PRESET = {
    "prompts": 2,
    "min_tokens": 200,
    "max_tokens_prompt": 300,
    "budgets": [0.2, 0.5],
    "new_tokens": 8,
    "engine_prompts": 1,
    "capacity_requests": 4,
    "capacity_full_seqs": 2,
    "capacity_prompt_tokens": 128,
}


# -- arguments -----------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.eviction", description=__doc__)
    add = p.add_argument
    add("--quick", action="store_true", help="smoke run (2 short prompts, 2 budgets)")
    add("--prompts", type=int, help="summary prompts for figures 1-2 (full: 8)")
    add("--min-tokens", type=int, help="shortest summary prompt (full: 1000)")
    add("--max-tokens-prompt", type=int, help="longest summary prompt (full: 2000)")
    add("--budgets", type=_ratios, help="kv_ratio values, e.g. 0.2,0.5,0.7,0.9")
    add("--policies", type=_policies, default=list(POLICIES), help="e.g. window,h2o")
    add("--new-tokens", type=int, help="generated tokens per request (full: 64)")
    add("--engine-prompts", type=int, help="prompts figure 2 also runs in the engine (full: 3)")
    add("--capacity-requests", type=int, help="requests in figure 3 (full: 16)")
    add("--capacity-full-seqs", type=int, help="pool size, in full-policy sequences (full: 4)")
    add("--capacity-prompt-tokens", type=int, help="figure 3 prompt length (full: 1000)")
    add("--capacity-ratio", type=float, default=0.5, help="kv_ratio of figure 3 (0.5)")
    add("--figures", type=_figures, default=[1, 2, 3], help="which figures, e.g. 1,2")
    add("--engine-gumbel", choices=["finite", "as-is"], default="finite", help=_GUMBEL_HELP)
    add("--seed", type=int, default=1000, help="request seed of prompt 0 (i: seed + i)")
    add("--threads", type=int, default=1, help="torch.set_num_threads (1: see README)")
    add("--out-dir", type=Path, default=RESULTS_DIR, help="where results go")
    add("--name", help="result file stem (default: full, or quick with --quick)")
    args = p.parse_args(argv)
    for key, value in (QUICK_PRESET if args.quick else FULL_PRESET).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.name = args.name or ("quick" if args.quick else "full")
    args.engine_prompts = min(args.engine_prompts, args.prompts)
    if 2 in args.figures and 1 not in args.figures:
        p.error("figure 2 compares against figure 1's runs: --figures must include 1")
    return args


_GUMBEL_HELP = (
    "finite (default): the engine draws Keyformer noise through "
    "bench.eviction_dense.finite_gumbel_noise (which would replace a +inf; the "
    "engine's table-based noise has none, so both modes draw the same noise, see "
    "bench/README.md); as-is: the engine untouched"
)


def _ratios(text: str) -> list[float]:
    values = [float(v) for v in text.split(",") if v.strip()]
    if not values or not all(0.0 < v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"expected ratios in (0, 1] like 0.2,0.5, got {text!r}")
    return values


def _policies(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [n for n in names if n not in POLICIES]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"policies are {list(POLICIES)}, got {text!r}")
    return names


def _figures(text: str) -> list[int]:
    values = sorted({int(v) for v in text.split(",") if v.strip()})
    if not values or not set(values) <= {1, 2, 3}:
        raise argparse.ArgumentTypeError(f"figures are 1, 2, 3, got {text!r}")
    return values


def policy_configs(args: argparse.Namespace) -> list[Config]:
    return [Config(p, r) for p in args.policies for r in args.budgets]


# -- figure 1 (and the tool's greedy tokens for figure 2) ----------------------


def measure_prompt(
    model: torch.nn.Module, prompt: Prompt, configs: list[Config], args: argparse.Namespace
) -> dict[Config, RunResult]:
    """Prefill once, then decode full (with the oracle) and every config together."""
    tau_init = configs[0].settings().tau_init if configs else 1.0
    prefill = run_prefill(model, prompt.token_ids, prompt.seed, tau_init)
    specs = [RunSpec(FULL.settings(), tuple(args.budgets))]
    specs += [RunSpec(c.settings()) for c in configs]
    results = BatchDecode(model, prefill, specs, args.new_tokens).run()
    return dict(zip([FULL, *configs], results, strict=True))


def mass_summary(runs: list[dict[Config, RunResult]], configs: list[Config]) -> dict[str, Any]:
    """Figure 1 from every prompt's runs: per cell, mean over prompts of the
    mean over decode steps, layers and query heads; per layer and per step too."""
    cells = [_mass_cell(c, [r[c].mass for r in runs]) for c in configs]
    ratios = sorted({c.ratio for c in configs if c.ratio is not None})
    oracle = [_mass_cell(Config("oracle", x), [r[FULL].oracle[x] for r in runs]) for x in ratios]
    return {"cells": cells, "oracle": oracle}


def _mass_cell(config: Config, masses: list[torch.Tensor]) -> dict[str, Any]:
    """masses: per prompt [steps, L, heads]."""
    per_prompt = [float(m.mean()) for m in masses]
    per_layer = torch.stack([m.mean(dim=(0, 2)) for m in masses]).mean(0)
    per_step = torch.stack([m.mean(dim=(1, 2)) for m in masses]).mean(0)
    worst = int(per_layer.argmin())
    return {
        "policy": config.policy,
        "ratio": config.ratio,
        "mean": statistics.fmean(per_prompt),
        "std_over_prompts": statistics.pstdev(per_prompt),
        "per_prompt": per_prompt,
        "worst_layer": worst,
        "worst_layer_mean": float(per_layer[worst]),
        "per_layer": _rounded(per_layer),
        "per_step": _rounded(per_step),
    }


def _rounded(t: torch.Tensor) -> list[float]:
    return [round(float(x), 5) for x in t]


# -- figure 2 -------------------------------------------------------------------


def match_cells(
    tokens: dict[tuple[int, Config], list[int]], prompts: range, configs: list[Config]
) -> list[dict[str, Any]]:
    """Per config: leading tokens identical to full's output, per prompt."""
    cells = []
    for c in configs:
        per_prompt = [matching_prefix(tokens[i, c], tokens[i, FULL]) for i in prompts]
        cells.append(
            {
                "policy": c.policy,
                "ratio": c.ratio,
                "per_prompt": per_prompt,
                "mean": statistics.fmean(per_prompt),
                "median": statistics.median(per_prompt),
                "identical_outputs": sum(
                    m == len(tokens[i, FULL]) for m, i in zip(per_prompt, prompts, strict=True)
                ),
            }
        )
    return cells


def cross_check(
    tool: dict[tuple[int, Config], list[int]], engine: dict[tuple[int, Config], list[int]]
) -> dict[str, Any]:
    """The measurement model's greedy tokens against the engine's, run by run."""
    mismatches = [
        {"prompt": i, "config": c.label, "first_divergence": matching_prefix(t, tool[i, c])}
        for (i, c), t in engine.items()
        if t != tool[i, c]
    ]
    return {
        "runs": len(engine),
        "identical": len(engine) - len(mismatches),
        "mismatches": mismatches,
    }


# -- the run ---------------------------------------------------------------------


class Bench:
    """Runs the figures in order, saving the report after each stage."""

    def __init__(self, args: argparse.Namespace, report: dict[str, Any], save: Callable) -> None:
        self.args = args
        self.report = report
        self.save = save
        self.configs = policy_configs(args)
        stages = 2 + args.prompts * (1 in args.figures) + (2 in args.figures)
        stages += (1 + len(args.policies)) * (3 in args.figures)
        self.progress = Progress(total=stages)
        self.tool_tokens: dict[tuple[int, Config], list[int]] = {}

    def run(self) -> None:
        try:
            self._load()
            if 1 in self.args.figures:
                self._figure1()
            if 2 in self.args.figures:
                self._figure2()
            if 3 in self.args.figures:
                self._figure3()
        finally:
            self.progress.close()

    def _stage(self, label: str, work: Callable[[], str]) -> None:
        self.progress.start(label)
        start = time.perf_counter()
        message = work()
        self.progress.finish(f"{message} ({time.perf_counter() - start:.0f}s)")
        self.save(self.report)

    def _load(self) -> None:
        def load() -> str:
            # The measurement model needs the weights, not the engine's pool.
            self.llm = load_llm(kv_cache_blocks=1)
            return "model loaded"

        def prompts() -> str:
            a, tok = self.args, self.llm.get_tokenizer()
            self.prompts = summary_prompts(
                tok, a.prompts, a.min_tokens, a.max_tokens_prompt, a.seed
            )
            self.report["prompts"] = [p.describe() for p in self.prompts]
            lengths = [len(p.token_ids) for p in self.prompts]
            return f"{len(lengths)} summary prompts of {min(lengths)}-{max(lengths)} tokens"

        self._stage("loading the model", load)
        self._stage("building prompts", prompts)

    def _figure1(self) -> None:
        runs: list[dict[Config, RunResult]] = []
        t0 = time.perf_counter()
        for i, prompt in enumerate(self.prompts):

            def one(i: int = i, prompt: Prompt = prompt) -> str:
                runs.append(measure_prompt(self.llm.engine.model, prompt, self.configs, self.args))
                for c, r in runs[-1].items():
                    self.tool_tokens[i, c] = r.tokens
                self.report["attention_mass"] = mass_summary(runs, self.configs)
                self.report["attention_mass"]["time_s"] = round(time.perf_counter() - t0, 1)
                self.report["tool_tokens"] = _token_table(self.tool_tokens)
                return _mass_line(runs[-1], self.configs)

            self._stage(
                f"fig 1: prompt {i + 1}/{len(self.prompts)} ({len(prompt.token_ids)} tok)", one
            )

    def _figure2(self) -> None:
        def engine_runs() -> str:
            a = self.args
            prompts = self.prompts[: a.engine_prompts]
            with engine_noise(a.engine_gumbel):
                tokens, stats = greedy_outputs(prompts, [FULL, *self.configs], a.new_tokens)
            self.report["greedy_match"] = {
                "tool": match_cells(self.tool_tokens, range(len(self.prompts)), self.configs),
                "engine": match_cells(tokens, range(len(prompts)), self.configs),
                "engine_prompts": len(prompts),
                "engine_stats": stats,
                "cross_check": cross_check(self.tool_tokens, tokens),
                "engine_tokens": _token_table(tokens),
            }
            check = self.report["greedy_match"]["cross_check"]
            return f"engine == tool on {check['identical']}/{check['runs']} runs"

        self._stage(
            f"fig 2: engine, {self.args.engine_prompts} prompt(s) x all configs", engine_runs
        )

    def _figure3(self) -> None:
        a = self.args
        tok = self.llm.get_tokenizer()
        prompts = capacity_prompts(tok, a.capacity_requests, a.capacity_prompt_tokens, a.seed)
        pool = pool_for(a.capacity_full_seqs, a.capacity_prompt_tokens, a.new_tokens)
        llm = load_llm(kv_cache_blocks=pool, max_num_seqs=MAX_NUM_SEQS)
        runs: list[dict[str, Any]] = []
        self.report["capacity"] = {"pool_blocks": pool, "runs": runs}
        for config in [FULL, *(Config(p, a.capacity_ratio) for p in a.policies)]:

            def one(config: Config = config) -> str:
                with engine_noise(a.engine_gumbel):
                    run = capacity_run(llm, prompts, config, a.new_tokens)
                runs.append(run.as_dict())
                return (
                    f"{config.label}: peak running {run.peak_running}, peak blocks "
                    f"{run.peak_used_blocks}/{pool}, preemptions {run.preemptions}"
                )

            self._stage(f"fig 3: {config.label}", one)


def _mass_line(run: dict[Config, RunResult], configs: list[Config]) -> str:
    parts = [f"{c.label} {float(run[c].mass.mean()):.3f}" for c in configs]
    return "mass " + ", ".join(parts)


def _token_table(tokens: dict[tuple[int, Config], list[int]]) -> list[dict[str, Any]]:
    return [{"prompt": i, "config": c.label, "tokens": t} for (i, c), t in tokens.items()]


def settings(args: argparse.Namespace) -> dict[str, Any]:
    from bench.data import corpus_path

    return {
        "model": "embedded SmolLM2-135M-Instruct (engine.loading.default_model), float32, CPU",
        "policies": args.policies,
        "budgets": args.budgets,
        "kv_settings": {k: v for k, v in FULL.settings().__dict__.items() if k != "kv_policy"}
        | {"kv_min_tokens": 0},
        "prompts": args.prompts,
        "prompt_tokens": [args.min_tokens, args.max_tokens_prompt],
        "new_tokens": args.new_tokens,
        "engine_prompts": args.engine_prompts,
        "capacity": {
            "requests": args.capacity_requests,
            "prompt_tokens": args.capacity_prompt_tokens,
            "full_sequences": args.capacity_full_seqs,
            "kv_ratio": args.capacity_ratio,
            "block_size": 16,
            "max_num_seqs": MAX_NUM_SEQS,
        },
        "decoding": "greedy (temperature 0), ignore_eos, seed = --seed + prompt index",
        "engine_gumbel": args.engine_gumbel,
        "threads": args.threads,
        "figures": args.figures,
        "text_source": str(corpus_path()),
        "quick": args.quick,
    }


def main(argv: Sequence[str] | None = None) -> int:
    start = time.perf_counter()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    git_provenance()  # the commit as the run starts: it may outlive later commits
    torch.set_num_threads(args.threads)
    report: dict[str, Any] = {
        "command": shlex.join(["python", "-m", "bench.eviction", *argv]),
        "load_average_start": load_average(),
        "machine": machine_info(),
        "settings": settings(args),
    }

    def save(partial: dict[str, Any], complete: bool = False) -> list[Path]:
        partial["complete"] = complete
        partial["load_average_end"] = load_average()
        partial["wall_time_s"] = round(process_age_s() or time.perf_counter() - start, 1)
        return write_results(partial, args.out_dir, args.name, plot=complete)

    Bench(args, report, save).run()
    paths = save(report, complete=True)
    log(f"wrote {', '.join(str(p) for p in paths)} ({report['wall_time_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
