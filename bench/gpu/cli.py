"""python -m bench.gpu: arguments, and the stages in order.

Order: the model folder; the engine; every policy at the first prompt count;
transformers' floor; the step profile; every policy at the other counts (the
longest runs last, so a budget cut leaves the table's core). Each stage is
bounded (--timeout-s), a failure is recorded and the next stage runs, and the
results are rewritten after each, so a killed run leaves what it finished.
"""

import argparse
import shlex
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench.gpu import report as rep
from bench.gpu import runs
from bench.gpu.shapes import (
    SHAPES,
    default_cache_dir,
    describe_shape,
    kv_bytes_per_token,
    make_prompts,
    model_folder,
)
from bench.provenance import git_provenance
from bench.throughput import log, process_age_s
from kv_manager.policies import POLICY_NAMES

# The GPU check's prompt seeds: one for the throughput runs, one for the profile.
THROUGHPUT_SEED, PROFILE_SEED = 3, 4
# The arguments the results record as the run's settings.
SETTING_KEYS = (
    "device",
    "dtype",
    "prompt_tokens",
    "new_tokens",
    "prompts",
    "policies",
    "kv_ratio",
    "kv_cache_bytes",
    "max_num_batched_tokens",
    "transformers_prompts",
    "profile_running",
    "profile_policies",
    "profile_decode_steps",
    "profile_steps",
    "timeout_s",
    "budget_s",
    "seed",
)


def _ints(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 64,256, got {text!r}")
    return values


def _policies(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [n for n in names if n not in POLICY_NAMES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"policies are among {list(POLICY_NAMES)}, got {text!r}")
    return names


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__)
    a = p.add_argument
    a("--shape", choices=sorted(SHAPES), default="llama-1b")
    a("--device", default="cuda")
    a("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    a("--prompt-tokens", type=int, default=1024)
    a("--new-tokens", type=int, default=256)
    a("--prompts", type=_ints, default=[64, 256], help="prompt counts, e.g. 64,256")
    a("--policies", type=_policies, default=["full", "keyformer", "h2o", "streaming", "window"])
    a("--kv-ratio", type=float, default=0.5)
    a("--kv-cache-bytes", default="4GiB")
    a("--max-num-batched-tokens", type=int, default=8192)
    a(
        "--transformers-prompts",
        type=int,
        help="the floor's batch (default: first of --prompts; 0: skip)",
    )
    a(
        "--profile-running",
        type=int,
        help="sequences in the step profile (default: first of --prompts; 0: skip)",
    )
    a("--profile-policies", type=_policies, default=["full", "keyformer"])
    a("--profile-decode-steps", type=int, default=32, help="decode steps timed per policy")
    a("--profile-steps", type=int, default=5, help="decode steps under torch.profiler")
    a("--timeout-s", type=float, default=300.0, help="bound on each stage")
    a("--budget-s", type=float, help="start no stage after this many seconds")
    a("--seed", type=int, default=0, help="of the random weights")
    a("--cache-dir", type=Path, default=default_cache_dir(), help="model folders")
    a("--tokenizer", type=Path, help="SmolLM2 tokenizer folder (default: the embedded model's)")
    a("--out-dir", type=Path, default=Path("bench/results/gpu"))
    a("--name", help="results file stem (default: SHAPE_DATE)")
    a("--commit", help="the commit of this tree, when it is a copy without .git")
    args = p.parse_args(argv)
    first = args.prompts[0]
    if args.transformers_prompts is None:
        args.transformers_prompts = first
    if args.profile_running is None:
        args.profile_running = first
    args.name = args.name or f"{args.shape}_{datetime.now(timezone.utc):%Y-%m-%d}"
    return args


def settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "shape": describe_shape(args.shape),
        **{k: getattr(args, k) for k in SETTING_KEYS},
        "max_num_seqs": max_num_seqs(args),
        "kv_bytes_per_token": kv_bytes_per_token(SHAPES[args.shape], args.dtype),
        "warmup": f"{runs.WARMUP_PROMPTS} of its prompts x {runs.WARMUP_TOKENS} tokens, untimed",
    }


def max_num_seqs(args: argparse.Namespace) -> int:
    return max([*args.prompts, args.profile_running])


class Stages:
    """Runs each stage once, records how it went in report["stages"], saves."""

    def __init__(self, report: dict[str, Any], budget_s: float | None, save: Callable) -> None:
        self.report, self.budget_s, self.save = report, budget_s, save
        self.start = time.perf_counter()

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        elapsed = time.perf_counter() - self.start
        entry: dict[str, Any] = {"name": name, "status": "ok", "seconds": 0.0}
        result = None
        if self.budget_s is not None and elapsed > self.budget_s:
            entry.update(status="skipped", note=f"--budget-s {self.budget_s:g} spent")
        else:
            log(f"[bench.gpu] {name} ...")
            t0 = time.perf_counter()
            try:
                result = fn()
            except Exception as e:  # noqa: BLE001 - record it; the next stage runs
                log(traceback.format_exc())
                entry.update(status="error", note=f"{type(e).__name__}: {e}"[:300])
            entry["seconds"] = round(time.perf_counter() - t0, 1)
            if isinstance(result, dict) and result.get("timed_out"):
                entry.update(
                    status="timeout",
                    note=f"stopped at --timeout-s {self.report['settings']['timeout_s']:g}",
                )
        log(f"[bench.gpu] {name}: {entry['status']} ({entry['seconds']} s) {entry.get('note', '')}")
        self.report["stages"].append(entry)
        self.save()
        return result


def run_all(args: argparse.Namespace, report: dict[str, Any], stages: Stages) -> None:
    made = stages.run("model", lambda: _model(args))
    if made is None:
        return
    report["model"] = made
    loaded = stages.run("engine", lambda: _engine(args, Path(made["folder"])))
    if loaded is None:
        return
    llm, report["engine"] = loaded
    count = max([*args.prompts, args.transformers_prompts])
    prompts = make_prompts(count, args.prompt_tokens, THROUGHPUT_SEED)
    for i, n in enumerate(args.prompts):
        for policy in args.policies:
            row = stages.run(
                f"{policy} x {n}",
                lambda p=policy, n=n: runs.engine_throughput(llm, p, prompts[:n], args),
            )
            if row is not None:
                report["rows"].append(row)
        if i == 0:
            _floor_and_profile(args, report, stages, llm, prompts, Path(made["folder"]))


def _floor_and_profile(args, report, stages, llm, prompts, folder) -> None:
    if args.transformers_prompts > 0:
        n = args.transformers_prompts
        hf = stages.run(
            f"transformers x {n}", lambda: runs.transformers_floor(folder, prompts[:n], args)
        )
        report["transformers"] = hf
    if args.profile_running > 0:
        batch = make_prompts(args.profile_running, args.prompt_tokens, PROFILE_SEED)
        for policy in args.profile_policies:
            name = f"profile {policy} x {args.profile_running}"
            got = stages.run(name, lambda p=policy: runs.step_profile(llm, p, batch, args))
            if got is not None:
                report["profile"].append(got)


def _model(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    folder, made = model_folder(
        args.shape, args.dtype, args.device, args.cache_dir, args.tokenizer, args.seed
    )
    return {"folder": str(folder), "made_now": made, "seconds": round(time.perf_counter() - t0, 1)}


def _engine(args: argparse.Namespace, folder: Path) -> tuple[Any, dict[str, Any]]:
    t0 = time.perf_counter()
    llm = runs.load_engine(folder, args, max_num_seqs(args))
    return llm, {**runs.engine_facts(llm), "load_s": round(time.perf_counter() - t0, 1)}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    provenance = git_provenance()  # the commit as the run starts
    start = time.perf_counter()
    report: dict[str, Any] = {
        "commit": rep.commit_of(provenance, args.commit),
        "command": shlex.join(["python", "-m", "bench.gpu", *argv]),
        "machine": rep.machine(args.device),
        "settings": settings(args),
        "complete": False,
        "stages": [],
        "rows": [],
        "transformers": None,
        "profile": [],
    }

    def save() -> tuple[Path, Path]:
        report["wall_time_s"] = round(process_age_s() or time.perf_counter() - start, 1)
        return rep.write_results(report, args.out_dir, args.name)

    run_all(args, report, Stages(report, args.budget_s, save))
    report["complete"] = True
    json_path, md_path = save()
    log(f"[bench.gpu] wrote {json_path} and {md_path}")
    print(md_path.read_text())
    failed = [s["name"] for s in report["stages"] if s["status"] == "error"]
    return 1 if failed else 0
