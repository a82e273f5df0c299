"""Offline throughput of two checkouts in paired rounds (A B A B ...).

    python -m bench.paired --a /path/to/base-checkout --b . --sizes 16,64 --rounds 3

Each run is a fresh process started in one checkout (so it imports that
checkout's engine) that loads the embedded SmolLM2, warms up, and times
`LLM.generate` on N prompts of exactly --prompt-tokens tokens with
--new-tokens new ones (EOS ignored, kv_policy full; greedy in float32 unless
--dtype, --temperature or --top-p say otherwise). Within a round A
and B run back to back; the figure is the median over rounds of the per-round
ratio B / A of output tokens/s, which cancels drift of the shared machine
that a ratio of per-column medians would not. Results go to
bench/results/throughput/<name>.{json,md}, with both checkouts' commits.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from bench.provenance import describe, git_provenance, read_git_provenance, write_json

RESULTS_DIR = Path(__file__).parent / "results" / "throughput"

# Runs inside the checkout under test: only the offline API both sides share.
WORKER = """
import json, sys, time, torch
from bench.data import token_passages
from engine import LLM, SamplingParams
cfg = json.loads(sys.argv[1])
torch.set_num_threads(cfg["threads"])
llm = LLM(dtype=cfg["dtype"], device="cpu", kv_cache_bytes="4GiB", max_num_seqs=64)
prompts = token_passages(llm.get_tokenizer().encode, max(cfg["sizes"]), cfg["prompt_tokens"])
def params(n):
    return SamplingParams(temperature=cfg["temperature"], top_p=cfg["top_p"], max_tokens=n,
                          ignore_eos=True, kv_policy="full")
llm.generate([prompts[0][:16]], params(4))  # warm-up: kernels built, pages touched
seconds = {}
for n in cfg["sizes"]:
    start = time.perf_counter()
    outs = llm.generate(prompts[:n], params(cfg["new_tokens"]))
    seconds[n] = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == cfg["new_tokens"] for o in outs)
print(json.dumps(seconds))
"""


def commit_of(tree: Path) -> str:
    """The checkout's short commit, " (dirty)" when its tracked files have
    uncommitted changes ("unknown" outside git)."""
    return describe(read_git_provenance(tree))


def run_once(tree: Path, config: dict) -> dict[int, float]:
    """Seconds per prompt count, from one fresh process in `tree`."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(
        [sys.executable, "-c", WORKER, json.dumps(config)],
        cwd=tree, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return {int(n): s for n, s in json.loads(done.stdout.strip().splitlines()[-1]).items()}


def paired_ratios(a: list[dict[int, float]], b: list[dict[int, float]], n: int) -> list[float]:
    """Per round, B's tokens/s over A's (= A's seconds over B's) for N = n."""
    return [ra[n] / rb[n] for ra, rb in zip(a, b, strict=True)]


def summarize(args: argparse.Namespace, runs: dict[str, list[dict[int, float]]]) -> dict:
    sizes = {}
    for n in args.sizes:
        ratios = paired_ratios(runs["a"], runs["b"], n)
        tok = {k: [n * args.new_tokens / r[n] for r in runs[k]] for k in ("a", "b")}
        sizes[n] = {
            "a_tok_s": tok["a"],
            "b_tok_s": tok["b"],
            "ratios": ratios,
            "median_ratio": statistics.median(ratios),
        }
    return {
        "command": "python -m bench.paired " + " ".join(sys.argv[1:]),
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "a": {"tree": str(args.a), "commit": commit_of(args.a)},
        "b": {"tree": str(args.b), "commit": commit_of(args.b)},
        "workload": {
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
            "threads": args.threads,
            "rounds": args.rounds,
            "dtype": args.dtype,
            "temperature": args.temperature,
            "top_p": args.top_p,
        },
        "sizes": sizes,
    }


def markdown(result: dict) -> str:
    w = result["workload"]
    lines = [
        "# Paired offline throughput: B against A",
        "",
        f"Command: `{result['command']}`  ",
        f"Date (UTC): {result['date_utc']}  ",
        f"A: {result['a']['commit']}; B: {result['b']['commit']}",
        "",
        f"Embedded SmolLM2-135M-Instruct, {w['dtype']}, CPU, "
        f"{w['threads']} threads; {w['prompt_tokens']}-token prompts, {w['new_tokens']} new "
        f"tokens, {_sampling(w)}, kv_policy full; {w['rounds']} rounds, A then B in each.",
        "",
        "| N | A tok/s per round | B tok/s per round | B/A per round | median B/A |",
        "|---:|---|---|---|---:|",
    ]
    for n, s in result["sizes"].items():

        def fmt(xs: list[float], digits: int = 1) -> str:
            return ", ".join(f"{x:.{digits}f}" for x in xs)

        lines.append(
            f"| {n} | {fmt(s['a_tok_s'])} | {fmt(s['b_tok_s'])} | {fmt(s['ratios'], 3)} "
            f"| {s['median_ratio']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def _sampling(workload: dict) -> str:
    if not workload["temperature"]:
        return "greedy"
    return f"sampled at temperature {workload['temperature']}, top_p {workload['top_p']}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--a", type=Path, required=True, help="the baseline checkout")
    p.add_argument("--b", type=Path, default=Path("."), help="the checkout compared with it")
    p.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[16, 64])
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--name", default="paired")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    args.a, args.b = args.a.resolve(), args.b.resolve()
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    git_provenance()  # the commit as the run starts: it may outlive later commits
    config = {
        "sizes": args.sizes,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "threads": args.threads,
        "dtype": args.dtype,
        "temperature": args.temperature,
        "top_p": args.top_p,
    }
    runs: dict[str, list[dict[int, float]]] = {"a": [], "b": []}
    for r in range(args.rounds):
        for side in ("a", "b"):
            runs[side].append(run_once(getattr(args, side), config))
            print(f"round {r + 1} {side}: {runs[side][-1]}", file=sys.stderr, flush=True)
    print(write_report(args.out_dir, args.name, summarize(args, runs)))


def write_report(out_dir: Path, name: str, result: dict) -> str:
    """out_dir/NAME.json (with this harness's own commit beside A's and B's) and
    out_dir/NAME.md (returned)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / f"{name}.json", result, indent=2)
    text = markdown(result)
    (out_dir / f"{name}.md").write_text(text)
    return text


if __name__ == "__main__":
    main()
