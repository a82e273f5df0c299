"""python -m bench.decode_attention: the CPU decode-attention kernel alone,
over a 30-layer cache of SmolLM2's shape (9 query / 3 KV heads, D = 64), one
decode step's worth of calls with each layer's KV in its own memory, so that
it is read from DRAM as in serving. Prints ms per step and GB/s of K and V.

Used for the before/after figures in bench/README.md (one thread, run A B A B
against the previous commit's kernel) and in bench/results/bf16_decode
(`--dtype bfloat16 --block-size 128 --threads 2 --shapes 16x576 64x576`).
"""

import argparse
import time

import torch

from engine.host.huge_pages import empty_with_huge_pages
from engine.kernels.cpu import paged_decode_attention

LAYERS, HQ, HKV, D = 30, 9, 3, 64
# sequences x keys; logits (the scored path) on the first only
DEFAULT_SHAPES = ["16x550", "8x2304", "16x1100"]


def step_ms(kernel, caches, batch: int, keys: int, logits: bool, block: int) -> float:
    k_cache, v_cache = caches
    blocks = -(-keys // block)
    tables = torch.randperm(k_cache.shape[1])[: batch * blocks].view(batch, blocks).contiguous()
    q = torch.randn(batch, HQ, D, dtype=k_cache.dtype)
    out = torch.empty_like(q)
    num_keys = torch.full((batch,), keys, dtype=torch.long)
    logits_out = torch.empty(batch, HQ, blocks * block) if logits else torch.empty(0)
    best = float("inf")
    for _ in range(7):
        start = time.perf_counter()
        for layer in range(LAYERS):
            kernel(out, q, k_cache[layer], v_cache[layer], tables, num_keys, D**-0.5, logits_out)
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def make_caches(args: argparse.Namespace, pool_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each layer's K and V in memory of its own, as the engine allocates them."""
    dtype = getattr(torch, args.dtype)
    shape = (LAYERS, pool_tokens // args.block_size, args.block_size, HKV, D)
    if args.small_pages:
        return torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    cpu = torch.device("cpu")
    return tuple(  # type: ignore[return-value]
        empty_with_huge_pages(*shape, dtype=dtype, device=cpu).normal_() for _ in range(2)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="SEQSxKEYS ...")
    parser.add_argument(
        "--small-pages", action="store_true", help="4 KB pages (the engine advises 2 MB ones)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kernel = paged_decode_attention()
    if kernel is None:
        raise SystemExit("the CPU kernels are not available here (see engine/kernels/cpu.py)")
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes]
    pool = max(b * -(-k // args.block_size) * args.block_size for b, k in shapes)
    caches = make_caches(args, max(pool, 2048 * 16))
    size = torch.finfo(caches[0].dtype).bits // 8
    for i, (batch, keys) in enumerate(shapes):
        logits = i == 0 and args.shapes == DEFAULT_SHAPES
        ms = step_ms(kernel, caches, batch, keys, logits, args.block_size)
        gbs = LAYERS * batch * keys * HKV * D * size * 2 / ms / 1e6
        print(f"{batch} x {keys} keys, logits={logits}: {ms:.1f} ms/step, {gbs:.1f} GB/s")


if __name__ == "__main__":
    main()
