"""Paired rounds (A B A B ...) of the embedded SmolLM2 in bfloat16 on the CPU,
in one checkout: A forces the torch attention backend
(KEYSERVE_ATTENTION_BACKEND=torch: gather + SDPA decode, four index_put
writes), B runs the CPU backend (the C++ bf16 decode read in place, the
one-op write). bench/paired.py's workload (N prompts of --prompt-tokens
tokens, greedy, EOS ignored, kv_policy full, a fresh process per run), but
timing only decode: the engine steps until every prompt is prefilled
(bfloat16 prompts take the same torch code in both arms, and on this
machine they take minutes), then the steps until each request has
--new-tokens tokens are timed (up to N rows each), decode tok/s = the
tokens they made / their seconds. The figure is the median over rounds of
B/A decode tok/s.

    python -m bench.bf16_decode_pair --sizes 16 --new-tokens 32 --rounds 2

Also times the decode kernel alone (--kernel-only: just that), one step over
a 30-layer cache of SmolLM2's shape, as bench/decode_attention.py does in
float32: the C++ kernel in float32 and bfloat16, and torch's bfloat16 path.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.provenance import describe, git_provenance, write_json

REPO = Path(__file__).parents[1]
RESULTS = REPO / "bench" / "results" / "bf16_decode"
# Prints {N: [seconds, tokens] of the decode steps after the last prefill}
# (requests prefilled early have decoded a few tokens by then, and finish
# that much sooner: the same schedule in both arms).
BF16_WORKER = """
import json, sys, time, torch
from bench.data import token_passages
from engine import LLM, SamplingParams
cfg = json.loads(sys.argv[1])
torch.set_num_threads(cfg["threads"])
llm = LLM(dtype="bfloat16", device="cpu", kv_cache_bytes="4GiB", max_num_seqs=64)
prompts = token_passages(llm.get_tokenizer().encode, max(cfg["sizes"]), cfg["prompt_tokens"])
def params(n):
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, kv_policy="full")
llm.generate([prompts[0][:16]], params(4))  # warm-up: kernels built, pages touched
engine, seconds = llm.engine, {}
for n in cfg["sizes"]:
    for i in range(n):
        engine.add_request(f"{n}-{i}", prompts[i], params(cfg["new_tokens"] + 1))
    started = set()
    while len(started) < n:  # prefill: each request's first token
        started |= {o.request_id for o in engine.step()}
    start, tokens = time.perf_counter(), 0
    while engine.has_unfinished_requests():
        tokens += len(engine.step())
    seconds[n] = [time.perf_counter() - start, tokens]
print(json.dumps(seconds))
"""
ARMS = {"a": {"KEYSERVE_ATTENTION_BACKEND": "torch"}, "b": {"KEYSERVE_ATTENTION_BACKEND": "cpu"}}


def run_once(env_extra: dict, config: dict) -> dict[int, list[float]]:
    env = {**os.environ, **env_extra, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", BF16_WORKER, json.dumps(config)],
        cwd=REPO, env=env, capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return {int(n): st for n, st in json.loads(done.stdout.strip().splitlines()[-1]).items()}


LAYERS, HQ, HKV, D, BLOCK = 30, 9, 3, 64, 16


def kernel_step_ms(dtype, batch: int, keys: int, use_torch: bool) -> float:
    """Best of 5 of one decode step's 30 layers, each layer's KV its own memory."""
    from engine.kernels.cpu import paged_decode_attention

    kernel = paged_decode_attention()
    blocks = -(-keys // BLOCK)
    pool = batch * blocks + 8
    k_cache = torch.randn(LAYERS, pool, BLOCK, HKV, D).to(dtype)
    v_cache = torch.randn(LAYERS, pool, BLOCK, HKV, D).to(dtype)
    tables = torch.randperm(pool)[: batch * blocks].view(batch, blocks).contiguous()
    q = torch.randn(batch, HQ, D).to(dtype)
    out = torch.empty_like(q)
    num_keys = torch.full((batch,), keys, dtype=torch.long)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for layer in range(LAYERS):
            if use_torch:  # TorchBackend.decode: gather the blocks, then SDPA
                kk = k_cache[layer][tables].flatten(1, 2).transpose(1, 2)
                vv = v_cache[layer][tables].flatten(1, 2).transpose(1, 2)
                F.scaled_dot_product_attention(q.unsqueeze(2), kk, vv, scale=D**-0.5,
                                               enable_gqa=True)  # fmt: skip
            else:
                kernel(out, q, k_cache[layer], v_cache[layer], tables, num_keys, D**-0.5,
                       torch.empty(0))  # fmt: skip
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def kernel_table(threads: int) -> list[dict]:
    torch.set_num_threads(threads)
    rows = []
    for batch, keys in ((16, 640), (64, 640), (8, 2304)):
        row = {"batch": batch, "keys": keys}
        row["cpp_float32_ms"] = kernel_step_ms(torch.float32, batch, keys, False)
        row["cpp_bfloat16_ms"] = kernel_step_ms(torch.bfloat16, batch, keys, False)
        row["torch_bfloat16_ms"] = kernel_step_ms(torch.bfloat16, batch, keys, True)
        rows.append(row)
        print(row, file=sys.stderr, flush=True)
    return rows


def paired(args: argparse.Namespace) -> dict:
    config = {"sizes": args.sizes, "prompt_tokens": args.prompt_tokens,
              "new_tokens": args.new_tokens, "threads": args.threads}  # fmt: skip
    runs: dict[str, list[dict[int, list[float]]]] = {"a": [], "b": []}
    for r in range(args.rounds):
        for side in ("a", "b"):
            runs[side].append(run_once(ARMS[side], config))
            print(f"round {r + 1} {side}: {runs[side][-1]}", file=sys.stderr, flush=True)
    sizes = {}
    for n in args.sizes:
        tok = {k: [r[n][1] / r[n][0] for r in runs[k]] for k in ("a", "b")}
        ratios = [b / a for a, b in zip(tok["a"], tok["b"], strict=True)]
        sizes[n] = {"a_tok_s": tok["a"], "b_tok_s": tok["b"], "ratios": ratios,
                    "median_ratio": statistics.median(ratios)}  # fmt: skip
    return {"workload": config | {"rounds": args.rounds}, "arms": ARMS, "sizes": sizes}


def markdown(result: dict) -> str:
    def fmt(xs, digits=1):
        return ", ".join(f"{x:.{digits}f}" for x in xs)

    lines = [
        "# bfloat16 on the CPU: torch attention backend (A) against the C++ kernels (B)",
        "",
        f"Command: `{result['command']}`  ",
        f"Date (UTC): {result['date_utc']}  ",
        f"Commit: {describe(result)}; CPU: {result['cpu']}",
        "",
    ]
    if "sizes" in result:
        w = result["workload"]
        lines += [
            f"Embedded SmolLM2-135M-Instruct, bfloat16, {w['threads']} threads; "
            f"{w['prompt_tokens']}-token prompts; timed: the decode steps after the last "
            f"prefill, until each request has {w['new_tokens']} tokens (prefill not timed); "
            f"greedy, kv_policy full; {w['rounds']} rounds, A then B in each. "
            "A: KEYSERVE_ATTENTION_BACKEND=torch; B: KEYSERVE_ATTENTION_BACKEND=cpu.",
            "",
            "| N | A decode tok/s per round | B decode tok/s per round | B/A per round "
            "| median B/A |",
            "|---:|---|---|---|---:|",
        ]
        for n, s in result["sizes"].items():
            lines.append(f"| {n} | {fmt(s['a_tok_s'])} | {fmt(s['b_tok_s'])} | "
                         f"{fmt(s['ratios'], 3)} | {s['median_ratio']:.3f} |")  # fmt: skip
        lines.append("")
    lines += [
        f"Decode attention alone, one step of 30 layers (9/3 heads, D = 64, 16-slot "
        f"blocks, no logits), {result['kernel_threads']} threads, best of 5, ms:",
        "",
        "| sequences x keys | C++ float32 | C++ bfloat16 | torch bfloat16 (gather + SDPA) |",
        "|---|---:|---:|---:|",
    ]
    for r in result["kernel"]:
        lines.append(f"| {r['batch']} x {r['keys']} | {r['cpp_float32_ms']:.1f} | "
                     f"{r['cpp_bfloat16_ms']:.1f} | {r['torch_bfloat16_ms']:.1f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[16, 64])
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--kernel-only", action="store_true")
    p.add_argument("--name", default="smollm2_bf16")
    args = p.parse_args()
    result = dict(git_provenance())
    result["command"] = "python -m bench.bf16_decode_pair " + " ".join(sys.argv[1:])
    result["date_utc"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    result["cpu"] = next((ln.split(":", 1)[1].strip() for ln in
                          Path("/proc/cpuinfo").read_text().splitlines()
                          if ln.startswith("model name")), "unknown")  # fmt: skip
    if not args.kernel_only:
        result |= paired(args)
    result["kernel_threads"] = args.threads
    result["kernel"] = kernel_table(args.threads)
    write_json(RESULTS / f"{args.name}.json", result)
    (RESULTS / f"{args.name}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
