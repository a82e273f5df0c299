"""Long-context throughput and capacity at a fixed KV pool: full against the
evicting policies, offline through the engine (no HTTP).

    python -m bench.long_context --prompt-tokens 2048 --new-tokens 256 \\
        --num-prompts 32 --pool-seqs 8 --policies full,h2o,keyformer --kv-ratio 0.5

The pool holds `--pool-seqs` sequences of prompt + new tokens in full; every
policy runs the same prompts (random token ids, seeded: throughput depends on
shapes, not on text) on the same engine, one policy after the other.
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from bench.provenance import git_provenance, write_json
from engine import LLM, SamplingParams


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="model folder or .gguf (default: SmolLM2)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--prompt-tokens", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--pool-seqs", type=int, default=8, help="full sequences the pool holds")
    p.add_argument("--policies", default="full,h2o,keyformer")
    p.add_argument("--kv-ratio", type=float, default=0.5)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--out", type=Path, default=Path("bench/results/long_context"))
    p.add_argument("--name", default="long_context")
    return p.parse_args(argv)


def make_prompts(n: int, length: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab - 1, (length,), generator=g).tolist() for _ in range(n)]


def run_policy(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> dict:
    """Step the engine to completion; peak concurrency and memory, and speed."""
    engine = llm.engine
    base = engine.stats()
    for i, p in enumerate(prompts):
        engine.add_request(f"{params.kv_policy}-{i}", p, params)
    peak_running = peak_blocks = steps = 0
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
        peak_running = max(peak_running, engine.scheduler.num_running)
        peak_blocks = max(peak_blocks, engine.kv.num_used_blocks)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    stats = engine.stats()
    out_tokens = len(prompts) * params.max_tokens
    return {
        "policy": params.kv_policy,
        "seconds": round(seconds, 3),
        "output_tokens_per_s": round(out_tokens / seconds, 2),
        "peak_running": peak_running,
        "peak_blocks_used": peak_blocks,
        "steps": steps,
        "preemptions": stats["preemptions"] - base["preemptions"],
        "tokens_evicted": stats["tokens_evicted"] - base["tokens_evicted"],
        "blocks_freed_by_eviction": stats["blocks_freed_by_eviction"]
        - base["blocks_freed_by_eviction"],
    }


def markdown(meta: dict, rows: list[dict]) -> str:
    full = next((r for r in rows if r["policy"] == "full"), None)
    lines = [
        f"# Long-context throughput at a fixed pool ({meta['device']})",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"{meta['num_prompts']} prompts of {meta['prompt_tokens']} tokens, "
        f"{meta['new_tokens']} new tokens each (ignore_eos), pool of "
        f"{meta['pool_blocks']} blocks x {meta['block_size']} = "
        f"{meta['pool_seqs']} full sequences; kv_ratio {meta['kv_ratio']}. "
        f"torch {meta['torch']}, {meta['date']}.",
        "",
        "| policy | output tok/s | x full | peak running | x full | peak blocks | "
        "preemptions | tokens evicted | blocks freed | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        speedup = r["output_tokens_per_s"] / full["output_tokens_per_s"] if full else float("nan")
        conc = r["peak_running"] / full["peak_running"] if full else float("nan")
        lines.append(
            f"| {r['policy']} | {r['output_tokens_per_s']} | {speedup:.2f} | "
            f"{r['peak_running']} | {conc:.2f} | {r['peak_blocks_used']} | "
            f"{r['preemptions']} | {r['tokens_evicted']} | {r['blocks_freed_by_eviction']} | "
            f"{r['seconds']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    git_provenance()  # the commit as the run starts: it may outlive later commits
    per_seq = args.prompt_tokens + args.new_tokens
    pool_blocks = args.pool_seqs * -(-per_seq // args.block_size)
    llm = LLM(
        model=args.model,
        dtype=args.dtype,
        block_size=args.block_size,
        kv_cache_blocks=pool_blocks,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        skip_tokenizer_init=True,
    )
    prompts = make_prompts(args.num_prompts, args.prompt_tokens, llm.engine.vocab_size)
    # Warm-up: one short request, so kernels and allocators are ready.
    llm.generate([prompts[0][:64]], SamplingParams(temperature=0, max_tokens=4))
    rows = []
    for policy in args.policies.split(","):
        params = SamplingParams(
            temperature=0,
            max_tokens=args.new_tokens,
            ignore_eos=True,
            seed=0,
            kv_policy=policy,
            kv_ratio=args.kv_ratio,
        )
        rows.append(run_policy(llm, prompts, params))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    meta = {
        "command": "python -m bench.long_context " + " ".join(argv or sys.argv[1:]),
        "device": str(llm.engine.device)
        + (
            f" ({torch.cuda.get_device_name()})"
            if llm.engine.device.type == "cuda"
            else f" ({platform.processor() or platform.machine()})"
        ),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "dtype": str(llm.engine.dtype),
        "num_prompts": args.num_prompts,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "pool_seqs": args.pool_seqs,
        "pool_blocks": pool_blocks,
        "block_size": args.block_size,
        "kv_ratio": args.kv_ratio,
    }
    print(write_report(args.out, args.name, meta, rows))
    return 0


def write_report(out: Path, name: str, meta: dict, rows: list[dict]) -> str:
    """out/NAME.json (meta, rows and the git commit) and out/NAME.md (returned)."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{name}.json", {"meta": meta, "rows": rows}, indent=2)
    text = markdown(meta, rows)
    (out / f"{name}.md").write_text(text)
    return text


if __name__ == "__main__":
    sys.exit(main())
