"""Offline bfloat16 generation of the embedded SmolLM2 on the CPU, one
checkout against another (A: --before, e.g. main; B: --after, this one),
A B A B in fresh processes: LLM(dtype="bfloat16", kv_policy=P) for each P,
--prompts passages of --prompt-tokens tokens, --new-tokens new tokens each,
greedy, EOS ignored; timed: the whole llm.generate (the prompt pass is most
of it at 16 new tokens), after a short warm-up generate. Prints one JSON
line per run and the per-policy medians.

    python -m bench.checkout_pair --before /work/main --after . \
        --policies full,keyformer --rounds 2
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

WORKER = """
import json, sys, time, torch
from bench.data import token_passages
from engine import LLM, SamplingParams
cfg = json.loads(sys.argv[1])
torch.set_num_threads(cfg["threads"])
llm = LLM(dtype="bfloat16", device="cpu", kv_cache_bytes="2GiB", kv_policy=cfg["policy"])
prompts = token_passages(llm.get_tokenizer().encode, cfg["prompts"], cfg["prompt_tokens"])
params = SamplingParams(temperature=0.0, max_tokens=cfg["new_tokens"], ignore_eos=True)
llm.generate([prompts[0][:64]], SamplingParams(max_tokens=2))  # warm-up: kernels built
backends = sorted({a.backend.name for a in llm.engine.model.attention_layers()})
start = time.perf_counter()
outs = llm.generate(prompts, params)
seconds = time.perf_counter() - start
tokens = sum(len(o.outputs[0].token_ids) for o in outs)
print(json.dumps({"seconds": seconds, "output_tokens": tokens, "backends": backends}))
"""


def run_once(checkout: Path, config: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    done = subprocess.run([sys.executable, "-c", WORKER, json.dumps(config)], cwd=checkout,
                          env=env, capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--after", type=Path, default=Path("."))
    parser.add_argument("--policies", default="full,keyformer")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    runs: dict[str, dict[str, list[float]]] = {}
    for _ in range(args.rounds):
        for policy in args.policies.split(","):
            config = {
                "policy": policy,
                "prompts": args.prompts,
                "threads": args.threads,
                "prompt_tokens": args.prompt_tokens,
                "new_tokens": args.new_tokens,
            }
            for arm, checkout in (("before", args.before), ("after", args.after)):
                result = run_once(checkout.resolve(), config)
                print(json.dumps({"arm": arm, "policy": policy, **result}), flush=True)
                runs.setdefault(policy, {}).setdefault(arm, []).append(result["seconds"])
    for policy, arms in runs.items():
        before, after = statistics.median(arms["before"]), statistics.median(arms["after"])
        print(f"{policy}: before {before:.2f} s, after {after:.2f} s, {before / after:.2f}x")


if __name__ == "__main__":
    main()
