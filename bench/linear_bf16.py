"""A model's bfloat16 linear layers, oneDNN against the project's AVX-512-BF16
kernel (engine/kernels/linear.py): every linear of one forward pass at M
rows (SmolLM2-135M's shapes by default: 30 layers of QKV, O, gate-up and
down, and the LM head), random weights, ms per pass and GFLOP/s, the two
timed in turn.

    python -m bench.linear_bf16 --threads 2 --rows 1,16,64,512,2048 \\
        --out bench/results/bf16_linear/smollm2.md
"""

import argparse
import sys
from functools import partial
from pathlib import Path

import torch
from torch import nn

from bench.prompt_kernels import interleaved_ms
from bench.provenance import cpu_description, cpu_line, git_provenance, write_json
from engine.kernels.linear import Bf16Linear, PackedLinear

# SmolLM2-135M: hidden 576, 9 query / 3 KV heads of 64, MLP 1536, vocab 49152.
LAYER_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (out, in)
LM_HEAD = (49152, 576)


def shapes(layers: int) -> list[tuple[int, int]]:
    return LAYER_SHAPES * layers + [LM_HEAD]


def one_pass(modules: list[nn.Module], inputs: dict[int, torch.Tensor]) -> None:
    for module in modules:
        module(inputs[module.in_features])


def measure(rows: int, sides: dict[str, list[nn.Module]], repeat: int) -> dict[str, float]:
    """{side: median ms of one pass at `rows` rows}, the sides in turn."""
    widths = {m.in_features for m in next(iter(sides.values()))}
    inputs = {k: torch.randn(rows, k, dtype=torch.bfloat16) for k in widths}
    passes = {side: partial(one_pass, modules, inputs) for side, modules in sides.items()}
    return {side: t["median"] for side, t in interleaved_ms(passes, repeat).items()}


def markdown(args: argparse.Namespace, rows: list[dict]) -> str:
    lines = [
        "# bfloat16 linears: oneDNN against keyserve's AVX-512-BF16 kernel",
        "",
        f"Command: `python -m bench.linear_bf16 {' '.join(args.argv)}`",
        "",
        f"Commit {git_provenance()['git_commit']}; CPU: {cpu_line(cpu_description())}; "
        f"{torch.get_num_threads()} threads.",
        "",
        f"Every linear of one forward pass of {args.layers} layers of SmolLM2-135M's shapes "
        "plus the LM head, random bfloat16 weights; median of "
        f"{args.repeat} passes each, the two timed in turn.",
        "",
        "| rows (M) | oneDNN (ms) | keyserve (ms) | oneDNN GFLOP/s | keyserve GFLOP/s | speedup |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['rows']} | {r['onednn_ms']:.2f} | {r['keyserve_ms']:.2f} | "
            f"{r['onednn_gflops']:.0f} | {r['keyserve_gflops']:.0f} | {r['speedup']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m bench.linear_bf16", description=__doc__)
    p.add_argument("--rows", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64])
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="a .md file; its .json beside")
    args = p.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    plain = [nn.Linear(k, n, bias=False, dtype=torch.bfloat16) for n, k in shapes(args.layers)]
    sides = {
        "onednn": [PackedLinear(m) for m in plain],
        "keyserve": [Bf16Linear(m) for m in plain],
    }
    flops = sum(2 * m.in_features * m.out_features for m in plain)
    results = []
    for rows in args.rows:
        ms = measure(rows, sides, args.repeat)
        results.append(
            {
                "rows": rows,
                **{f"{side}_ms": t for side, t in ms.items()},
                **{f"{side}_gflops": flops * rows / t / 1e6 for side, t in ms.items()},
                "speedup": ms["onednn"] / ms["keyserve"],
            }
        )
    report = markdown(args, results)
    print(report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
        write_json(args.out.with_suffix(".json"), {"command": args.argv, "results": results})
    return results


if __name__ == "__main__":
    main()
