"""python -m bench.decode_attention: the CPU decode-attention kernel alone,
over a 30-layer cache of SmolLM2's shape (9 query / 3 KV heads, D = 64), one
decode step's worth of calls with each layer's KV in its own memory, so that
it is read from DRAM as in serving. Prints ms per step and GB/s of K and V.

Used for the before/after figures in bench/README.md (one thread, run A B A B
against the previous commit's kernel).
"""

import argparse
import time

import torch

from engine.host.huge_pages import empty_with_huge_pages
from engine.kernels.cpu import paged_decode_attention

LAYERS, HQ, HKV, D, BLOCK = 30, 9, 3, 64, 16
SHAPES = ((16, 550, True), (8, 2304, False), (16, 1100, False))  # sequences, keys, logits


def step_ms(kernel, k_cache, v_cache, batch: int, keys: int, logits: bool) -> float:
    blocks = -(-keys // BLOCK)
    tables = torch.randperm(k_cache.shape[1])[: batch * blocks].view(batch, blocks).contiguous()
    q = torch.randn(batch, HQ, D)
    out = torch.empty_like(q)
    num_keys = torch.full((batch,), keys, dtype=torch.long)
    logits_out = torch.empty(batch, HQ, blocks * BLOCK) if logits else torch.empty(0)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for layer in range(LAYERS):
            kernel(out, q, k_cache[layer], v_cache[layer], tables, num_keys, D**-0.5, logits_out)
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--small-pages", action="store_true", help="4 KB pages (the engine advises 2 MB ones)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kernel = paged_decode_attention()
    if kernel is None:
        raise SystemExit("the CPU kernels are not available here (see engine/kernels/cpu.py)")
    shape = (LAYERS, 2048, BLOCK, HKV, D)
    cpu = torch.device("cpu")
    if args.small_pages:
        k_cache, v_cache = torch.randn(shape), torch.randn(shape)
    else:  # as engine/runtime/kv_cache.py allocates it
        k_cache = empty_with_huge_pages(*shape, dtype=torch.float32, device=cpu).normal_()
        v_cache = empty_with_huge_pages(*shape, dtype=torch.float32, device=cpu).normal_()
    for batch, keys, logits in SHAPES:
        ms = step_ms(kernel, k_cache, v_cache, batch, keys, logits)
        gbs = LAYERS * batch * keys * HKV * D * 4 * 2 / ms / 1e6
        print(f"{batch} x {keys} keys, logits={logits}: {ms:.1f} ms/step, {gbs:.1f} GB/s")


if __name__ == "__main__":
    main()
