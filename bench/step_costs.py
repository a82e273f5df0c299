"""python -m bench.step_costs: what one prompt pass and one decode step cost
per KV policy, offline, at the pool8 shape (why the end-to-end ratios are
what they are).

For each policy: the seconds of one prompt pass (median over prompts), and
the median decode step once the pool is full (as many sequences as fit:
full keeps 2,304 slots each, an evicting policy at kv_ratio r about r of
them). From the two it models the pool8 run (every request: one prompt
pass; then every output token at the full pool's decode rate) and prints
the tok/s that model gives, next to the decode-only tok/s, and the ceiling
of each policy's ratio to full: the ratio if its decode steps cost nothing,
full's modeled run over this policy's prompt passes alone.

    python -m bench.step_costs --threads 2
"""

import argparse
import math
import shlex
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench.data import token_passages
from bench.provenance import cpu_description, cpu_line, describe, git_provenance
from engine import LLM, SamplingParams


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.step_costs", description=__doc__)
    p.add_argument("--policies", default="full,h2o,keyformer")
    p.add_argument("--kv-ratio", type=float, default=0.5)
    p.add_argument("--prompt-tokens", type=int, default=2048)
    p.add_argument("--output-tokens", type=int, default=256, help="for the modeled run")
    p.add_argument("--requests", type=int, default=24, help="for the modeled run")
    p.add_argument("--kv-cache-blocks", type=int, default=1152)
    p.add_argument("--decode-steps", type=int, default=64, help="steps timed per policy")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="float32 by default, as the committed step_costs.md ran",
    )
    p.add_argument("--out", type=Path, default=Path("bench/results/performance/step_costs.md"))
    return p.parse_args()


def prompt_seconds(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> float:
    """Median wall time of one prompt pass (one token generated)."""
    one = replace(params, max_tokens=1)
    times = []
    for p in prompts:
        start = time.perf_counter()
        llm.generate({"prompt_token_ids": p}, one)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])  # the first warms up


def decode_step(llm: LLM, prompts: list[list[int]], params: SamplingParams, steps: int):
    """(median decode step in seconds, sequences running) with the pool full."""
    engine = llm.engine
    for i, p in enumerate(prompts):
        engine.add_request(f"costs-{i}", {"prompt_token_ids": p}, params)
    while engine.scheduler.num_waiting:  # every prompt admitted
        engine.step()
    for _ in range(4):  # the last prompt's chunks, and the first decodes
        engine.step()
    running = engine.scheduler.num_running
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    for i in range(len(prompts)):
        engine.abort_request(f"costs-{i}")
    return statistics.median(times), running


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    llm = LLM(dtype=args.dtype, kv_cache_blocks=args.kv_cache_blocks, max_num_seqs=64)
    tok = llm.get_tokenizer()
    block = llm.engine.config.block_size
    full_slots = math.ceil((args.prompt_tokens + args.output_tokens) / block) * block
    fit_full = args.kv_cache_blocks * block // full_slots
    prompts = token_passages(tok.encode, 3 + 2 * fit_full, args.prompt_tokens)
    rows = []
    for policy in args.policies.split(","):
        kv = {} if policy == "full" else {"kv_ratio": args.kv_ratio}
        params = SamplingParams(
            temperature=0.0, max_tokens=args.output_tokens, ignore_eos=True, kv_policy=policy, **kv
        )
        prefill = prompt_seconds(llm, prompts[:3], params)
        seqs = fit_full if policy == "full" else int(fit_full / args.kv_ratio)
        step, running = decode_step(llm, prompts[3 : 3 + seqs], params, args.decode_steps)
        decode = args.requests * args.output_tokens * step / running
        modeled = args.requests * prefill + decode
        rows.append((policy, prefill, running, step, running / step, modeled))
        print(rows[-1], flush=True)
    write(args, rows)


def write(args: argparse.Namespace, rows: list[tuple]) -> None:
    base = rows[0][-1]
    lines = [
        "# Step costs per KV policy",
        "",
        f"Command: `python -m bench.step_costs {shlex.join(sys.argv[1:])}`",
        "",
        f"Commit {describe(git_provenance())}; CPU: {cpu_line(cpu_description())}.",
        "",
        f"{args.dtype}; {args.prompt_tokens}-token prompts, "
        f"a pool of {args.kv_cache_blocks} blocks; "
        f"evicting policies at kv_ratio {args.kv_ratio}. Modeled run: {args.requests} "
        f"requests x {args.output_tokens} output tokens = every prompt pass, plus every "
        "output token at the decode tok/s of a full pool. Ceiling ratio: full's modeled "
        "run over this policy's prompt passes alone, the ratio if its decode cost nothing.",
        "",
        "| policy | prompt pass (s) | running | decode step (ms) | decode tok/s "
        "| modeled run (s) | modeled tok/s | modeled ratio | ceiling ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for policy, prefill, running, step, rate, modeled in rows:
        tps = args.requests * args.output_tokens / modeled
        ceiling = base / (args.requests * prefill)
        lines.append(
            f"| {policy} | {prefill:.2f} | {running} | {step * 1e3:.1f} | {rate:.1f} "
            f"| {modeled:.0f} | {tps:.1f} | {base / modeled:.2f} | {ceiling:.2f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
