"""Offline throughput: keyserve's LLM.generate against transformers' batched generate.

    python -m bench.throughput            # N = 1, 16, 64 prompts of 512 tokens, 128 new each
    python -m bench.throughput --quick    # smoke run: N = 1, 2; 64-token prompts; 8 new

Both engines run the same weights (the embedded SmolLM2-135M-Instruct, float32,
CPU), the same prompts (token ids cut from real news text, see bench/data.py)
and greedy decoding with EOS ignored. Results go to bench/results/throughput/.
"""

import argparse
import gc
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from bench.data import corpus_path, token_passages
from bench.provenance import describe, git_provenance, with_provenance, write_json

RESULTS_DIR = Path(__file__).parent / "results" / "throughput"
FULL = {"sizes": [1, 16, 64], "prompt_tokens": 512, "new_tokens": 128}
QUICK = {"sizes": [1, 2], "prompt_tokens": 64, "new_tokens": 8}
WARMUP_PROMPT_TOKENS = 16
WARMUP_NEW_TOKENS = 4


@dataclass
class Generation:
    """One timed generate call: wall time and each sequence's new token ids."""

    time_s: float
    token_ids: list[list[int]]

    @property
    def output_tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)


# -- progress ----------------------------------------------------------------


class Progress:
    """Stage progress on stderr: a tqdm bar when tqdm is installed, else plain lines."""

    def __init__(self, total: int) -> None:
        try:
            from tqdm import tqdm
        except ImportError:
            self._bar = None
        else:
            self._bar = tqdm(total=total, file=sys.stderr, unit="stage", dynamic_ncols=True)
        self._total = total
        self._done = 0

    def start(self, label: str) -> None:
        if self._bar is None:
            print(f"[{self._done + 1}/{self._total}] {label} ...", file=sys.stderr, flush=True)
        else:
            self._bar.set_description(label)

    def finish(self, message: str) -> None:
        self._done += 1
        if self._bar is None:
            print(f"  {message}", file=sys.stderr, flush=True)
        else:
            self._bar.write(f"  {message}", file=sys.stderr)
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- arguments ---------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__)
    p.add_argument("--quick", action="store_true", help="smoke run: N=1,2; 64+8 tokens")
    p.add_argument("--sizes", type=_int_list, help="prompt counts, e.g. 1,16,64")
    p.add_argument("--prompt-tokens", type=int, help="tokens per prompt (exact)")
    p.add_argument("--new-tokens", type=int, help="new tokens per prompt (exact)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for both")
    p.add_argument("--kv-cache-bytes", default="4GiB", help="keyserve KV pool size")
    p.add_argument("--max-num-seqs", type=int, default=64, help="keyserve batch size limit")
    p.add_argument(
        "--max-num-batched-tokens", type=int, default=2048, help="keyserve tokens per step"
    )
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where results go")
    p.add_argument("--name", help="result file stem (default: full, or quick with --quick)")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.name = args.name or ("quick" if args.quick else "full")
    if max(args.sizes) > args.max_num_seqs:
        p.error(f"--max-num-seqs {args.max_num_seqs} is below the largest N {max(args.sizes)}")
    return args


def _int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,16,64, got {text!r}")
    return values


# -- machine -----------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    import transformers

    return {
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def process_age_s() -> float | None:
    """Seconds since this process started (Linux), so the wall time includes
    interpreter start-up and imports; None elsewhere."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return None
    return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")


def load_average() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


# -- engines -----------------------------------------------------------------


def load_keyserve(args: argparse.Namespace) -> Any:
    from engine import LLM

    # The comparison with transformers is of full attention: greedy tokens must match.
    return LLM(
        dtype="float32",
        device="cpu",
        kv_policy="full",
        kv_cache_bytes=args.kv_cache_bytes,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
    )


def load_transformers(model_path: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(str(model_path), local_files_only=True)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        str(model_path), dtype=torch.float32, local_files_only=True
    )
    return model.eval(), tokenizer


def run_keyserve(llm: Any, prompts: list[list[int]], new_tokens: int) -> Generation:
    from engine import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    return Generation(elapsed, [list(o.outputs[0].token_ids) for o in outputs])


def run_transformers(
    model: Any, tokenizer: Any, prompts: list[list[int]], new_tokens: int
) -> Generation:
    batch = tokenizer.pad({"input_ids": prompts}, padding=True, return_tensors="pt")
    width = batch["input_ids"].shape[1]
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            **batch,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    elapsed = time.perf_counter() - start
    return Generation(elapsed, out[:, width:].tolist())


def timed(run: Callable[[], Generation]) -> tuple[Generation, list[float] | None]:
    """Run once after a garbage collection; returns the result and the load
    average seen just after it (a hint of how busy the machine was)."""
    gc.collect()
    result = run()
    return result, load_average()


# -- figures -----------------------------------------------------------------


def engine_figures(gen: Generation, n: int, prompt_tokens: int, new_tokens: int) -> dict:
    expected = n * new_tokens
    if gen.output_tokens != expected:
        raise RuntimeError(f"generated {gen.output_tokens} tokens, expected {expected}")
    return {
        "time_s": round(gen.time_s, 4),
        "output_tokens": gen.output_tokens,
        "output_tokens_per_s": round(gen.output_tokens / gen.time_s, 3),
        "requests_per_s": round(n / gen.time_s, 4),
        "total_tokens_per_s": round((n * prompt_tokens + gen.output_tokens) / gen.time_s, 3),
    }


def compare_tokens(ours: Generation, theirs: Generation, eos_ids: frozenset[int]) -> dict:
    """How many sequences keyserve and transformers decode identically, and where
    the others first differ. transformers' min_new_tokens bans EOS, while
    keyserve's ignore_eos may emit it, so a sequence with EOS differs by design."""
    first_diffs = [_first_diff(a, b) for a, b in zip(ours.token_ids, theirs.token_ids, strict=True)]
    diverged = [d for d in first_diffs if d is not None]
    return {
        "sequences": len(first_diffs),
        "matching_sequences": len(first_diffs) - len(diverged),
        "first_divergence_positions": sorted(diverged),
        "keyserve_sequences_with_eos": sum(any(t in eos_ids for t in s) for s in ours.token_ids),
    }


def _first_diff(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


# -- the run -----------------------------------------------------------------


def measure_size(
    n: int, prompts: list[list[int]], args: argparse.Namespace, llm: Any, hf: tuple[Any, Any]
) -> tuple[dict, Generation, Generation]:
    """Time keyserve then transformers on the first n prompts."""
    batch = prompts[:n]
    ours, load_ks = timed(lambda: run_keyserve(llm, batch, args.new_tokens))
    theirs, load_hf = timed(lambda: run_transformers(*hf, batch, args.new_tokens))
    ks = engine_figures(ours, n, args.prompt_tokens, args.new_tokens)
    tf = engine_figures(theirs, n, args.prompt_tokens, args.new_tokens)
    ks["load_average_after"], tf["load_average_after"] = load_ks, load_hf
    row = {
        "n": n,
        "keyserve": ks,
        "transformers": tf,
        "ratio_keyserve_over_transformers": round(
            ks["output_tokens_per_s"] / tf["output_tokens_per_s"], 4
        ),
        "greedy_match": compare_tokens(ours, theirs, llm.engine.eos_token_ids),
    }
    return row, ours, theirs


def warm_up(llm: Any, hf: tuple[Any, Any], prompt: list[int]) -> dict[str, float]:
    """One short generate per engine, untimed in the results."""
    ks = run_keyserve(llm, [prompt], WARMUP_NEW_TOKENS)
    tf = run_transformers(*hf, [prompt], WARMUP_NEW_TOKENS)
    return {"keyserve_s": round(ks.time_s, 4), "transformers_s": round(tf.time_s, 4)}


def run_benchmark(
    args: argparse.Namespace,
    progress: Progress,
    report: dict[str, Any],
    checkpoint: Callable[[dict[str, Any]], None],
) -> None:
    """Fill `report`, calling `checkpoint` after each N so that an interrupted
    run leaves the sizes it finished on disk."""
    from engine.loading.default_model import default_model_path

    progress.start("loading keyserve")
    t0 = time.perf_counter()
    llm = load_keyserve(args)
    load_ks = time.perf_counter() - t0
    progress.finish(f"keyserve loaded in {load_ks:.1f}s")

    progress.start("loading transformers")
    t0 = time.perf_counter()
    hf = load_transformers(default_model_path())
    load_hf = time.perf_counter() - t0
    progress.finish(f"transformers loaded in {load_hf:.1f}s")

    progress.start("cutting prompts")
    prompts = token_passages(llm.get_tokenizer().encode, max(args.sizes), args.prompt_tokens)
    progress.finish(f"{len(prompts)} prompts of {args.prompt_tokens} tokens")

    progress.start("warm-up")
    warm = warm_up(llm, hf, prompts[0][:WARMUP_PROMPT_TOKENS])
    progress.finish(f"warm-up done: {warm}")

    report.update(
        load_s={"keyserve": round(load_ks, 3), "transformers": round(load_hf, 3)},
        warmup=warm,
        prompt_preview=llm.get_tokenizer().decode(prompts[0][:48]),
        results=[],
    )
    for n in args.sizes:
        progress.start(f"N={n}")
        row, _, _ = measure_size(n, prompts, args, llm, hf)
        report["results"].append(row)
        checkpoint(report)
        progress.finish(_row_summary(row))


def _row_summary(row: dict) -> str:
    ks, tf, m = row["keyserve"], row["transformers"], row["greedy_match"]
    return (
        f"N={row['n']}: keyserve {ks['output_tokens_per_s']:.1f} tok/s ({ks['time_s']:.1f}s), "
        f"transformers {tf['output_tokens_per_s']:.1f} tok/s ({tf['time_s']:.1f}s), "
        f"ratio {row['ratio_keyserve_over_transformers']:.2f}, "
        f"greedy match {m['matching_sequences']}/{m['sequences']}"
    )


def settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": "embedded SmolLM2-135M-Instruct (engine.loading.default_model), float32, CPU",
        "sizes": args.sizes,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "decoding": "greedy; keyserve ignore_eos=True, transformers min_new_tokens=max_new_tokens",
        "threads": args.threads,
        "kv_cache_bytes": args.kv_cache_bytes,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "text_source": str(corpus_path()),
        "quick": args.quick,
    }


# -- outputs -----------------------------------------------------------------


def write_results(report: dict[str, Any], out_dir: Path, name: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{name}.json"
    md_path = out_dir / f"{name}.md"
    report = with_provenance(report)
    write_json(json_path, report, indent=2)
    md_path.write_text(render_markdown(report))
    return json_path, md_path


def render_markdown(report: dict[str, Any]) -> str:
    s, m = report["settings"], report["machine"]
    lines = [
        "# Offline throughput: keyserve vs transformers",
        "",
        *_incomplete_note(report),
        f"Command: `{report['command']}`  ",
        f"Wall time of the whole command{'' if report['complete'] else ' so far'}: "
        f"{report['wall_time_s']:.0f} s (process start to results written)  ",
        f"Date (UTC): {m['date_utc']}; git {describe(report)}",
        "",
        f"Machine: {m['cpu_count']} CPUs ({m['cpu_model']}), torch {m['torch']}, "
        f"transformers {m['transformers']}, torch threads: {s['threads']}, "
        f"load average at start {report['load_average_start']} / end {report['load_average_end']}.",
        "",
        f"Workload: N prompts of exactly {s['prompt_tokens']} tokens (distinct passages of the "
        f"gensim Lee news corpus), {s['new_tokens']} new tokens each, {s['decoding']}. "
        f"{s['model']}. keyserve: kv_cache_bytes={s['kv_cache_bytes']}, "
        f"max_num_seqs={s['max_num_seqs']}, "
        f"max_num_batched_tokens={s['max_num_batched_tokens']}; transformers: all N prompts in "
        "one left-padded batch. One short warm-up generate per engine before timing.",
        "",
        *_figures_table(report["results"]),
        "",
        "tok/s = N x new tokens / wall time of the generate call (prefill included). "
        "ratio = keyserve tok/s / transformers tok/s. req/s = N / wall time. "
        "Greedy match = sequences whose tokens equal transformers' exactly "
        "(first divergence positions in the JSON).",
        "",
        "Timings are noisy: the machine is shared (other processes, e.g. test runs, "
        "may run at the same time), and each figure is a single run. With as many torch "
        "threads as cores and other processes running, every parallel op can stall on a "
        "descheduled thread (see bench/README.md), so compare runs only at the same "
        "--threads and a similar load average.",
        "",
    ]
    return "\n".join(lines)


def _incomplete_note(report: dict[str, Any]) -> list[str]:
    if report["complete"]:
        return []
    done = [r["n"] for r in report["results"]]
    return [
        f"**Incomplete run**: sizes {done} of {report['settings']['sizes']} finished "
        "before it stopped.",
        "",
    ]


def _figures_table(rows: list[dict]) -> list[str]:
    out = [
        "| N | keyserve tok/s | transformers tok/s | ratio | keyserve s | transformers s "
        "| keyserve req/s | transformers req/s | greedy match |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ks, tf, g = r["keyserve"], r["transformers"], r["greedy_match"]
        out.append(
            f"| {r['n']} | {ks['output_tokens_per_s']:.1f} | {tf['output_tokens_per_s']:.1f} "
            f"| {r['ratio_keyserve_over_transformers']:.2f} | {ks['time_s']:.2f} "
            f"| {tf['time_s']:.2f} | {ks['requests_per_s']:.3f} | {tf['requests_per_s']:.3f} "
            f"| {g['matching_sequences']}/{g['sequences']} |"
        )
    return out


# -- entry point -------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    start = time.perf_counter()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    git_provenance()  # the commit as the run starts: it may outlive later commits
    torch.set_num_threads(args.threads)
    report: dict[str, Any] = {
        "command": shlex.join(["python", "-m", "bench.throughput", *argv]),
        "load_average_start": load_average(),
        "machine": machine_info(),
        "settings": settings(args),
    }

    def save(partial: dict[str, Any], complete: bool = False) -> tuple[Path, Path]:
        partial["complete"] = complete
        partial["load_average_end"] = load_average()
        partial["wall_time_s"] = round(process_age_s() or time.perf_counter() - start, 1)
        return write_results(partial, args.out_dir, args.name)

    progress = Progress(total=4 + len(args.sizes))
    try:
        run_benchmark(args, progress, report, save)
    finally:
        progress.close()
    json_path, md_path = save(report, complete=True)
    log(f"wrote {json_path} and {md_path} ({report['wall_time_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
