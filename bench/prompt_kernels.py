"""One 512-token prompt's attention for one layer of SmolLM2's shape (9
query / 3 KV heads, D = 64), through the CPU backend's prompt paths, ms:

- float32 tiled: the C++ tiled kernels on float32 q, k, v;
- bfloat16 tiled: the same kernels on bfloat16 (prompt_paths.h's choice:
  AVX-512-BF16 dot products where the build has them);
- bfloat16 fallback: what CpuBackend ran for bfloat16 before the tiled
  kernels took it (torch SDPA for plain attention; for a scored one,
  _attend_and_score_prompt: float32 copies of K/V, torch matmuls per query
  chunk, the C++ score accumulation).

Plain, and scored as keyformer (Gumbel noise, tau rising over the chunk).
The variants are timed in turn, --repeat times; min and median, ms.

    python -m bench.prompt_kernels --threads 2
"""

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from engine.attention.backends.cpu import CpuBackend
from engine.attention.context import PrefillSpan
from engine.attention.geometry import LayerCache, LayerGeometry
from engine.attention.scoring import ScoreSpec
from engine.kernels import cpu as kernels
from kv_manager.scoring import gumbel_exp_table, gumbel_table

HQ, HKV, D, BLOCK = 9, 3, 64, 16


def interleaved_ms(fns: dict, repeat: int) -> dict[str, dict[str, float]]:
    """{name: {min, median} ms}, the variants timed in turn `repeat` times
    (a shared machine's load then weighs on each alike)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {n: {"min": min(t), "median": statistics.median(t)} for n, t in times.items()}


def inputs(n: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, h, D, generator=g).to(dtype) for h in (HQ, HKV, HKV))
    return q, k, v


def fallback_backend(n: int, dtype: torch.dtype) -> CpuBackend:
    blocks = -(-n // BLOCK)
    shape = (blocks, BLOCK, HKV, D)
    cache = LayerCache(3, torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype),
                       torch.zeros(blocks, BLOCK, HKV), torch.zeros(blocks, BLOCK, HKV,
                       dtype=torch.int32))  # fmt: skip
    return CpuBackend(LayerGeometry(HQ, HKV, D, D**-0.5, None, None), cache)


def scored_span(n: int) -> PrefillSpan:
    positions = torch.arange(n)
    spec = ScoreSpec(seed=7, gumbel=True, prompt_len=n // 2, tau_init=1.0, tau_slope=0.01)
    return PrefillSpan(token_start=0, num_tokens=n, slot_start=0, block_table=None,
                       query_positions=positions, key_slots=positions, score=spec)  # fmt: skip


def tiled(q, k, v, span: PrefillSpan | None):
    ops, out = kernels.ops(), torch.empty_like(q)
    if span is None:
        return lambda: ops.prefill_attention(out, q, k, v, D**-0.5)
    scores = torch.zeros(HKV, k.shape[0])
    pos = span.query_positions
    key_pos = pos.view(-1, 1).expand(-1, HKV).contiguous()
    tau = span.score.tau_at(pos).float().contiguous()
    table, exp_table = gumbel_table(), gumbel_exp_table()
    return lambda: ops.prefill_attention_scored(
        out, scores, q, k, v, D**-0.5, pos, key_pos, tau, 7, True, 3, table, exp_table
    )


def fallback(q, k, v, span: PrefillSpan | None):
    if span is None:  # CpuBackend.attend_prompt for a fresh prompt: causal SDPA
        qt, kt, vt = (t.unsqueeze(0).transpose(1, 2) for t in (q, k, v))
        return lambda: F.scaled_dot_product_attention(
            qt, kt, vt, is_causal=True, scale=D**-0.5, enable_gqa=True
        )
    backend = fallback_backend(q.shape[0], q.dtype)
    k_pos = span.query_positions.view(1, -1, 1).expand(1, -1, HKV)
    return lambda: backend._attend_and_score_prompt(q, k, v, k_pos, span)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n, results = args.tokens, {}
    for mode, span in (("plain", None), ("scored", scored_span(n))):
        f32, bf16 = inputs(n, torch.float32), inputs(n, torch.bfloat16)
        results[mode] = interleaved_ms(
            {
                "float32 tiled": tiled(*f32, span),
                "bfloat16 tiled": tiled(*bf16, span),
                "bfloat16 fallback": fallback(*bf16, span),
            },
            args.repeat,
        )
        for name, ms in results[mode].items():
            print(f"{mode}, {name}: min {ms['min']:.2f} ms, median {ms['median']:.2f} ms")
    print(json.dumps({"threads": args.threads, "tokens": n, "ms": results}))


if __name__ == "__main__":
    main()
