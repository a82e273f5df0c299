"""Command line of the load generator: python -m bench.serve --help."""

import argparse
import asyncio
import json
import shlex
import sys
from collections.abc import Sequence
from typing import Any

from bench.provenance import git_provenance
from bench.serve import render_report, run_load, write_results


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.serve",
        description="Load an OpenAI-compatible completions server and report its latency.",
    )
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    p.add_argument("--model", required=True, help="the served model name")
    p.add_argument("--prompt-tokens", type=int, default=512, help="prompt length (exact)")
    p.add_argument("--output-tokens", type=int, default=128, help="tokens per request (exact)")
    p.add_argument("--num-requests", type=int, default=64)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--concurrency", type=int, help="requests in flight at once")
    mode.add_argument("--rate", type=float, help="Poisson arrivals, requests per second")
    p.add_argument(
        "--extra-body", type=_json_object, help="merged into every body, e.g. '{\"kv_ratio\": 0.5}'"
    )
    p.add_argument(
        "--kv-pressure",
        choices=("preempt", "squeeze"),
        help="keyserve: every request's kv_pressure (merged into the extra body)",
    )
    p.add_argument(
        "--full-share",
        type=float,
        default=0.0,
        help="keyserve: this share of the requests (spread evenly) asks kv_policy full, "
        "a mixed load where full sequences grow beside evicting ones",
    )
    p.add_argument("--tokenizer", help="the model's folder (default: the embedded SmolLM2)")
    p.add_argument("--seed", type=int, default=0, help="picks the prompt windows and arrivals")
    p.add_argument("--api-key", help="sent as Authorization: Bearer KEY")
    p.add_argument("--metrics-interval", type=float, default=0.5, help="/metrics poll period (s)")
    p.add_argument("--out", help="write LABEL.json and LABEL.md into this folder")
    p.add_argument("--name", help="the run's label (default: from the mode)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if not 0.0 <= args.full_share <= 1.0:
        p.error(f"--full-share must be in [0, 1], got {args.full_share}")
    if args.kv_pressure:
        args.extra_body = {**(args.extra_body or {}), "kv_pressure": args.kv_pressure}
    if args.name is None:
        args.name = f"c{args.concurrency}" if args.concurrency else f"rate{args.rate:g}"
    return args


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    git_provenance()  # the commit as the run starts: it may outlive later commits
    result = asyncio.run(
        run_load(
            args.url,
            args.model,
            prompt_tokens=args.prompt_tokens,
            output_tokens=args.output_tokens,
            num_requests=args.num_requests,
            concurrency=args.concurrency,
            rate=args.rate,
            extra_body=args.extra_body,
            full_share=args.full_share,
            tokenizer=args.tokenizer,
            seed=args.seed,
            name=args.name,
            api_key=args.api_key,
            metrics_interval=args.metrics_interval,
            progress=not args.no_progress,
        )
    )
    result["command"] = shlex.join([sys.executable, "-m", "bench.serve", *sys.argv[1:]])
    print(render_report(result))
    if args.out:
        for path in write_results(result, args.out):
            print(f"wrote {path}", file=sys.stderr)
    # Failures under overload are figures (reported above); no answer at all is not.
    return 0 if result["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
