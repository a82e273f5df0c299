"""Greedy agreement of keyserve in bfloat16 with transformers in bfloat16 on the
CPU, on the embedded SmolLM2-135M-Instruct: per prompt, the tokens until the
first divergence, with keyserve float32 against transformers float32 as the
control (it should agree fully) and each system's bfloat16 against its own
float32 (how far bfloat16 alone moves greedy output).

    python -m bench.bf16_agreement            # the full report (see bench/README.md)
    python -m bench.bf16_agreement --quick    # smoke run: 2 short prompts, 16 new tokens

Prompts, all as token ids (the same ids go to both systems):
- short: the prompts tests/test_smollm2_parity.py checks in float32, the
  accuracy harness's held-back few-shot prompts (bench/accuracy/fewshot.py,
  the first of each default task) and its Lee summarization prompts;
- long: Lee news passages of exactly 2,048 and 4,096 tokens (bench.data) and
  the harness's pass-key retrieval prompts (bench/accuracy/retrieval.py).
Each system runs one prompt at a time (a batch of one, as transformers
does), greedy, past EOS, keyserve with kv_policy full.

Results: bench/results/bf16_parity/<name>.{md,json}.
"""

import argparse
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench.bf16_agreement_report import Case, Generation, write
from bench.provenance import cpu_description, git_provenance

RESULTS_DIR = Path(__file__).parent / "results" / "bf16_parity"
# tests/test_smollm2_parity.py's prompts (float32 parity is tested on them).
PARITY_PROMPTS = (
    "The history of the Roman Empire",
    "def fibonacci(n):\n    ",
    "Q: Why is the sky blue?\nA:",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
)
# label -> (system, dtype); dtype is always explicit ("auto" may change meaning).
RUNS = {
    "keyserve-bf16": ("keyserve", "bfloat16"),
    "keyserve-f32": ("keyserve", "float32"),
    "transformers-bf16": ("transformers", "bfloat16"),
    "transformers-f32": ("transformers", "float32"),
}


def _csv_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.bf16_agreement",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = p.add_argument
    add("--quick", action="store_true", help="smoke run: 2 short prompts, 16 new tokens")
    add("--short-tokens", type=int, default=128, help="new tokens per short prompt")
    add("--long-tokens", type=int, default=64, help="new tokens per long prompt")
    add("--fewshot-per-task", type=int, default=1, help="held-back few-shot prompts per task")
    add("--summaries", type=int, default=2, help="Lee summarization prompts")
    add("--passage-lengths", type=_csv_ints, default=[2048, 4096], help="tokens, comma list")
    add("--passages", type=int, default=2, help="Lee passages per length")
    add(
        "--retrieval-lengths",
        type=_csv_ints,
        default=[2048, 4096, 7168],
        help="pass-key prompt lengths (the accuracy harness's); empty: none",
    )
    add("--runs", default=",".join(RUNS), help="which of " + ", ".join(RUNS))
    add("--threads", type=int, default=None, help="torch threads (default: torch's)")
    add("--kv-cache-bytes", default="2GiB", help="keyserve's pool")
    add("--out", type=Path, default=RESULTS_DIR)
    add("--name", default=None, help="file stem (default: smollm2, or smollm2_quick)")
    args = p.parse_args(argv)
    args.runs = [r for r in args.runs.split(",") if r]
    if set(args.runs) - set(RUNS):
        p.error(f"unknown runs {sorted(set(args.runs) - set(RUNS))}")
    if args.quick:
        args.short_tokens = 16
    args.name = args.name or ("smollm2_quick" if args.quick else "smollm2")
    return args


# -- prompts -------------------------------------------------------------------


def short_cases(tok: Any, args: argparse.Namespace) -> list[Case]:
    from bench.accuracy import fewshot, summarization

    source = "tests/test_smollm2_parity.py"
    texts = [(f"parity-{i}", source, t) for i, t in enumerate(PARITY_PROMPTS)]
    if args.quick:
        texts = texts[:2]
    else:
        for task in fewshot.DEFAULT_TASKS:
            for item in fewshot.items(task, args.fewshot_per_task):
                texts.append((f"fewshot-{item.subtask}-{item.item_id}", "fewshot", item.prompt))
        for item in summarization.lee_items(tok, args.summaries):
            texts.append((f"summary-lee-{item.item_id}", "summarization", item.prompt))
    return [Case(n, "short", src, tok.encode(t), args.short_tokens) for n, src, t in texts]


def long_cases(tok: Any, args: argparse.Namespace) -> list[Case]:
    from bench.accuracy import retrieval
    from bench.data import token_passages

    if args.quick:
        return []
    cases = []
    for n in args.passage_lengths:
        for i, ids in enumerate(token_passages(tok.encode, args.passages, n)):
            cases.append(Case(f"lee-{n}-{i}", "long", "bench.data", ids, args.long_tokens))
    for item in retrieval.items(tok, args.retrieval_lengths, [50], 1):
        ids = tok.encode(item.prompt)
        name = f"passkey-{item.subtask}-{item.item_id}"
        cases.append(Case(name, "long", "retrieval", ids, args.long_tokens))
    return cases


# -- runs ----------------------------------------------------------------------


def _top2(scores: dict[int, float], chosen: int) -> tuple[float, int]:
    """(the chosen token's score minus the best other's, that other token):
    `scores` holds the top two tokens' (and the chosen one's) scores."""
    token = max((t for t in scores if t != chosen), key=lambda t: scores[t])
    return scores[chosen] - scores[token], token


def _top_scores(logits: Any, chosen: int) -> dict[int, float]:
    """The two highest logits and the chosen token's, by token (as logprobs come)."""
    values, indices = logits.float().topk(2)
    scores = dict(zip(indices.tolist(), values.tolist(), strict=True))
    scores[chosen] = float(logits[chosen])
    return scores


def _generation(tokens: list[int], top: list[tuple[float, int]], seconds: float) -> Generation:
    return Generation(tokens, [m for m, _ in top], [t for _, t in top], seconds)


def keyserve_greedy(dtype: str, cases: Sequence[Case], args: argparse.Namespace) -> list[Any]:
    from engine import LLM, SamplingParams

    llm = LLM(dtype=dtype, device="cpu", kv_policy="full", kv_cache_bytes=args.kv_cache_bytes)
    gens = []
    for case in cases:
        params = SamplingParams(
            temperature=0.0, max_tokens=case.new_tokens, ignore_eos=True, logprobs=2
        )
        start = time.perf_counter()
        out = llm.generate([case.token_ids], params)[0].outputs[0]
        top = [
            _top2({t: lp.logprob for t, lp in step.items()}, chosen)
            for step, chosen in zip(out.logprobs, out.token_ids, strict=True)
        ]
        gens.append(_generation(list(out.token_ids), top, time.perf_counter() - start))
    return gens


def transformers_greedy(dtype: str, cases: Sequence[Case], args: argparse.Namespace) -> list[Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from engine.loading.loader import resolve_model_path

    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(None), dtype=getattr(torch, dtype)
    ).eval()
    model.generation_config.eos_token_id = None  # generate past EOS, as ignore_eos does
    gens = []
    for case in cases:
        ids = torch.tensor([case.token_ids])
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=case.new_tokens,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
            )
        tokens = out.sequences[0, ids.shape[1] :].tolist()
        top = [
            _top2(_top_scores(step[0], chosen), chosen)
            for step, chosen in zip(out.logits, tokens, strict=True)
        ]
        gens.append(_generation(tokens, top, time.perf_counter() - start))
    return gens


SYSTEMS: dict[str, Callable[..., list[Any]]] = {
    "keyserve": keyserve_greedy,
    "transformers": transformers_greedy,
}


# -- main ----------------------------------------------------------------------


def _meta(args: argparse.Namespace, argv: Sequence[str] | None, cases: list[Case]) -> dict:
    import torch
    import transformers

    words = ["python", "-m", "bench.bf16_agreement", *(sys.argv[1:] if argv is None else argv)]
    sets = {s: [c for c in cases if c.prompt_set == s] for s in ("short", "long")}
    workload = (
        f"Embedded SmolLM2-135M-Instruct; greedy, EOS ignored, one prompt at a time; "
        f"keyserve kv_policy full. {len(sets['short'])} short prompts x {args.short_tokens} "
        f"new tokens, {len(sets['long'])} long prompts x {args.long_tokens}."
    )
    return {
        "command": shlex.join(words),
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "provenance": git_provenance(),
        "cpu": cpu_description(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "env": {k: v for k, v in os.environ.items() if k.startswith("KEYSERVE_")},
        "workload": workload,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    git_provenance()  # read now: a long run may outlive later commits
    args = parse_args(argv)
    import torch

    from engine.loading.loader import resolve_model_path
    from engine.loading.tokenizer import load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    tok = load_tokenizer(resolve_model_path(None))
    cases = short_cases(tok, args) + long_cases(tok, args)
    meta = _meta(args, argv, cases)
    runs, meta["seconds_per_run"] = {}, {}
    for label in args.runs:
        system, dtype = RUNS[label]
        start = time.perf_counter()
        runs[label] = SYSTEMS[system](dtype, cases, args)
        meta["seconds_per_run"][label] = seconds = round(time.perf_counter() - start, 1)
        print(f"{label}: {len(cases)} prompts in {seconds}s (model load included)", flush=True)
    paths = write(args.out, args.name, meta, cases, runs)
    print(paths["markdown"].read_text())
    return paths


if __name__ == "__main__":
    main()
