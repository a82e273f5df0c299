"""The same load against several servers in turns (A B A B), on one machine.

Every server is started once and stays up (idle between its turns), then the
rounds run: each round sends the same load to every server in order, so slow
drift on a noisy machine touches all of them alike. Per server and load, the
median over rounds is reported, with its ratio to the first server: the
median of the per-round ratios (each server against the first one's run in
the same round), so each ratio compares two runs that met the same drift.

    # vLLM's CPU build (bench/peer/install_vllm_cpu.sh) against keyserve:
    python -m bench.peer.compare --vllm-python ../vllm-cpu-venv/bin/python \\
        --policies full --kv-cache-gib 2 --block-size 128 --prompt-tokens 512 \\
        --output-tokens 128 --concurrency 16 64 --num-requests 64 --rounds 2 \\
        --out bench/results/performance --name vllm_512_128

    # keyserve alone, KV memory the limit: full against h2o and keyformer.
    python -m bench.peer.compare --policies full h2o keyformer --kv-cache-blocks 1152 \\
        --prompt-tokens 2048 --output-tokens 256 --concurrency 32 --num-requests 32 \\
        --rounds 2 --out bench/results/performance --name pool8_2048_256
"""

import argparse
import asyncio
import os
import shlex
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.provenance import cpu_description, cpu_line, git_provenance, write_json
from bench.serve import render_table, run_load, write_results
from bench.server_process import keyserve_command, start_server, stop_server

MODEL_NAME = "smollm2"


@dataclass
class Server:
    label: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def model_folder() -> Path:
    from engine.loading.loader import resolve_model_path

    return resolve_model_path(None)


def vllm_server(python: str, args: argparse.Namespace, port: int) -> Server:
    cores = os.cpu_count() or 1
    command = [
        python, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_folder()),
        "--served-model-name", MODEL_NAME,
        "--port", str(port),
        "--dtype", args.dtype,
        "--max-num-seqs", str(args.max_num_seqs),
        *_block_size(args),
    ]  # fmt: skip
    env = {
        # Its best setting here (../shared/models.md): every core, none reserved.
        "VLLM_CPU_KVCACHE_SPACE": str(_whole_gib(args.kv_cache_gib)),
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    }
    return Server("vllm-cpu", command, env, port)


def _whole_gib(gib: float) -> int:
    """vLLM's CPU KV space is a whole number of GiB."""
    if gib != int(gib) or gib < 1:
        raise ValueError(f"--kv-cache-gib must be a whole number of GiB for vLLM, got {gib}")
    return int(gib)


def _block_size(args: argparse.Namespace) -> list[str]:
    """The same KV block size for every server, where one is asked for."""
    return ["--block-size", str(args.block_size)] if args.block_size else []


def _squeeze_floor(args: argparse.Namespace) -> list[str]:
    ratio = args.kv_squeeze_min_ratio
    return ["--kv-squeeze-min-ratio", str(ratio)] if ratio else []


def keyserve_server(
    policy: str, args: argparse.Namespace, port: int, pressure: str = "preempt"
) -> Server:
    pool = (
        ["--kv-cache-blocks", str(args.kv_cache_blocks)]
        if args.kv_cache_blocks
        else ["--kv-cache-bytes", f"{int(args.kv_cache_gib * 1024)}MiB"]
    )
    command = keyserve_command(
        port,
        "--served-model-name", MODEL_NAME,
        "--kv-policy", policy,
        "--kv-ratio", str(args.kv_ratio),
        "--kv-pressure", pressure,
        *(["--kv-min-tokens", str(args.kv_min_tokens)] if args.kv_min_tokens is not None else []),
        *_squeeze_floor(args),
        "--max-num-seqs", str(args.max_num_seqs),
        "--dtype", args.dtype,
        "--log-level", "warning",
        *_block_size(args),
        *pool,
    )  # fmt: skip
    # Today's behaviour keeps its old label, so earlier results still compare.
    label = f"keyserve-{policy}" if pressure == "preempt" else f"keyserve-{policy}-{pressure}"
    return Server(label, command, {}, port)


def start(server: Server, log_dir: Path, timeout: float = 600) -> None:
    log = open(log_dir / f"{server.label}.log", "w")  # noqa: SIM115 (lives with the process)
    server.process = start_server(
        server.command, server.url, env=server.env, log=log, timeout=timeout, label=server.label
    )


def stop(server: Server) -> None:
    stop_server(server.process)


def run_rounds(servers: list[Server], args: argparse.Namespace, out: Path) -> list[dict]:
    results = []
    loads = [(p, c) for p in args.prompt_tokens for c in args.concurrency]
    for round_ in range(1, args.rounds + 1):
        for load_index, (prompt_tokens, concurrency) in enumerate(loads):
            # Every server gets the same prompts within a round and load, but
            # no prompt repeats across them: a server with a prefix cache
            # (vLLM's is on by default) must not answer from an earlier run.
            seed = args.seed + 1000 * round_ + load_index
            for server in servers:
                load = _arrivals(concurrency, args.rate)
                name = f"{server.label}_p{prompt_tokens}_{load}_r{round_}"
                print(f"== {name}", file=sys.stderr, flush=True)
                result = asyncio.run(
                    run_load(
                        server.url,
                        MODEL_NAME,
                        prompt_tokens=prompt_tokens,
                        output_tokens=args.output_tokens,
                        num_requests=args.num_requests,
                        concurrency=concurrency,
                        rate=args.rate,
                        full_share=args.full_share,
                        seed=seed,
                        name=name,
                        progress=False,
                    )
                )
                result["server"] = server.label
                result["round"] = round_
                write_results(result, out / "runs")
                results.append(result)
    return results


def _figure(result: dict, *path: str) -> float | None:
    value: Any = result
    for key in path:
        if not isinstance(value, dict) or value.get(key) is None:
            return None
        value = value[key]
    return float(value)


# (column, path into a run_load result); medians over rounds of each.
SUMMARY_FIGURES = [
    ("output tok/s", ("output_throughput",)),
    ("req/s", ("request_throughput",)),
    ("TTFT p50 (ms)", ("ttft_ms", "p50")),
    ("TTFT p99 (ms)", ("ttft_ms", "p99")),
    ("TPOT p50 (ms)", ("tpot_ms", "p50")),
    ("ITL p99 (ms)", ("itl_ms", "p99")),
    ("peak running", ("peak_running",)),
    ("preemptions", ("preemptions",)),
    ("squeezes", ("squeezes",)),
]


def summary(results: list[dict], servers: list[Server], args: argparse.Namespace) -> str:
    cpu = cpu_description()
    lines = [
        f"# {args.name}",
        "",
        f"Command: `python -m bench.peer.compare {shlex.join(sys.argv[1:])}`",
        "",
        f"CPU: {cpu_line(cpu)}; dtype {args.dtype} for every server.",
        "",
        f"Prompts of {_list(args.prompt_tokens)} tokens cut from the Lee corpus, "
        f"{args.output_tokens} output tokens "
        f"(ignore_eos), {args.num_requests} requests per run, {args.rounds} rounds "
        f"in turns (A B A B). Medians over rounds; ratio = median over rounds of "
        f"output tok/s against {servers[0].label}'s run in the same round.",
        "",
    ]
    for prompt_tokens, concurrency in [
        (p, c) for p in args.prompt_tokens for c in args.concurrency
    ]:
        load = f"Poisson arrivals at {args.rate:g}/s" if args.rate else f"concurrency {concurrency}"
        lines += [f"## {prompt_tokens}-token prompts, {load}", ""]
        header = ["server", *(c for c, _ in SUMMARY_FIGURES), "ratio"]
        lines += ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
        base = servers[0].label
        for server in servers:
            medians = medians_of(results, server.label, prompt_tokens, concurrency)
            ratio = paired_ratio(results, server.label, base, prompt_tokens, concurrency)
            cells = [server.label, *(_cell(m) for m in medians), _cell(ratio, 2)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Every run", "", render_table(results)]
    return "\n".join(lines) + "\n"


def _runs_at(results: list[dict], label: str, prompt_tokens: int, concurrency: int) -> list:
    return [
        r for r in results
        if r["server"] == label
        and r["settings"]["prompt_tokens"] == prompt_tokens
        and r["settings"]["concurrency"] == concurrency
    ]  # fmt: skip


def medians_of(results: list[dict], label: str, prompt_tokens: int, concurrency: int) -> list:
    """Per SUMMARY_FIGURES column, the median over rounds of one server at one load."""
    runs = _runs_at(results, label, prompt_tokens, concurrency)
    return [_median([_figure(r, *path) for r in runs]) for _, path in SUMMARY_FIGURES]


def round_ratios(
    results: list[dict], label: str, base: str, prompt_tokens: int, concurrency: int
) -> list[float]:
    """Per round, `label`'s output tok/s over `base`'s in that same round and load.

    Rounds where either run has no throughput (or base's is 0) give no ratio.
    """
    rates = {
        server: {
            r["round"]: _figure(r, "output_throughput")
            for r in _runs_at(results, server, prompt_tokens, concurrency)
        }
        for server in (label, base)
    }
    ratios = []
    for round_, rate in sorted(rates[label].items()):
        base_rate = rates[base].get(round_)
        if rate is not None and base_rate:
            ratios.append(rate / base_rate)
    return ratios


def paired_ratio(
    results: list[dict], label: str, base: str, prompt_tokens: int, concurrency: int
) -> float | None:
    """The median of round_ratios: both runs of a ratio met the same machine
    drift, which a ratio of the two columns' medians (runs from different
    rounds) does not ensure."""
    return _median(round_ratios(results, label, base, prompt_tokens, concurrency))


def _arrivals(concurrency: int | None, rate: float | None) -> str:
    """A run name's load part: c16, or rate2 for Poisson arrivals."""
    return f"rate{rate:g}" if rate else f"c{concurrency}"


def _list(values: list[int]) -> str:
    return ", ".join(map(str, values))


def plot_scaling(results: list[dict], servers: list[Server], args, path: Path) -> None:
    """Output tok/s and TPOT p50 against prompt length, a line per server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    concurrency = args.concurrency[0]
    for server in servers:
        rows = [medians_of(results, server.label, p, concurrency) for p in args.prompt_tokens]
        left.plot(args.prompt_tokens, [r[0] for r in rows], marker="o", label=server.label)
        right.plot(args.prompt_tokens, [r[4] for r in rows], marker="o", label=server.label)
    left.set(xlabel="prompt tokens", ylabel="output tokens/s", title="Throughput")
    right.set(xlabel="prompt tokens", ylabel="TPOT p50 (ms)", title="Time per output token")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{args.name}: concurrency {concurrency}, {args.output_tokens} output tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _cell(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vllm-python", help="python of a venv with vllm-cpu: adds vLLM first")
    p.add_argument("--policies", nargs="*", default=["full"], help="keyserve KV policies")
    p.add_argument("--kv-ratio", type=float, default=0.5)
    p.add_argument(
        "--kv-pressure",
        nargs="+",
        choices=("preempt", "squeeze"),
        default=["preempt"],
        help="keyserve servers' --kv-pressure: one server per policy and value",
    )
    p.add_argument("--kv-min-tokens", type=int, help="keyserve's --kv-min-tokens (its floor)")
    p.add_argument(
        "--kv-squeeze-min-ratio",
        type=float,
        default=0.0,
        help="keyserve's --kv-squeeze-min-ratio (a squeeze's floor as a share of the budget)",
    )
    p.add_argument(
        "--full-share",
        type=float,
        default=0.0,
        help="share of requests sent with kv_policy full (keyserve only: a mixed load)",
    )
    p.add_argument("--kv-cache-gib", type=float, default=2.0, help="KV pool of every server")
    p.add_argument(
        "--kv-cache-blocks", type=int, help="keyserve pool in blocks (of 16 tokens by default)"
    )
    p.add_argument(
        "--block-size",
        type=int,
        help="KV block size in tokens for every server (default: each its own: "
        "keyserve 16, vLLM's CPU build 128)",
    )
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"], help="for every server"
    )
    p.add_argument("--prompt-tokens", type=int, nargs="+", default=[512])
    p.add_argument("--output-tokens", type=int, default=128)
    p.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    p.add_argument(
        "--rate",
        type=float,
        help="instead of --concurrency: Poisson arrivals at this many requests/s (a bursty "
        "load: requests queue when they arrive faster than the server finishes them)",
    )
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base-port", type=int, default=8300)
    p.add_argument("--out", type=Path, default=Path("bench/results/performance"))
    p.add_argument("--name", default="compare")
    args = p.parse_args(argv)
    if args.rate:
        args.concurrency = [None]  # one load per prompt length, arrivals by rate
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    git_provenance()  # the commit as the run starts: it may outlive later commits
    out = args.out / args.name
    (out / "logs").mkdir(parents=True, exist_ok=True)
    servers = []
    if args.vllm_python:
        servers.append(vllm_server(args.vllm_python, args, args.base_port))
    pairs = [(policy, pressure) for policy in args.policies for pressure in args.kv_pressure]
    for i, (policy, pressure) in enumerate(pairs, start=1):
        servers.append(keyserve_server(policy, args, args.base_port + i, pressure))
    try:
        for server in servers:
            start(server, out / "logs")
        results = run_rounds(servers, args, out)
    finally:
        for server in servers:
            stop(server)
    print(write_outputs(results, servers, args, out))
    return 0


def write_outputs(
    results: list[dict], servers: list[Server], args: argparse.Namespace, out: Path
) -> str:
    """results.json (every run, and the git commit), summary.md (returned) and,
    with several prompt lengths, scaling.png."""
    write_json(out / "results.json", {"runs": results}, indent=1)
    text = summary(results, servers, args)
    (out / "summary.md").write_text(text)
    if len(args.prompt_tokens) > 1:
        plot_scaling(results, servers, args, out / "scaling.png")
    return text


if __name__ == "__main__":
    sys.exit(main())
