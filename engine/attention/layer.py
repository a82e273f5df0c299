"""The attention layer over the paged KV cache: write the new K/V by slot,
then hand the decode rows and each prompt chunk to the layer's backend.

NOTE: K is stored after RoPE and attention is independent per head, so the
order and identity of tokens in a head's slots do not matter to the math; only
ALiBi, sliding windows and Keyformer's noise need each key's original
position, which the cache keeps per (layer, head, slot). Causality is by slot:
every cached slot precedes the new tokens, which are appended in order.
"""

import math

import torch
from torch import nn

from engine.attention.backends import AttentionBackend, select_backend
from engine.attention.context import AttentionContext
from engine.attention.geometry import LayerCache, LayerGeometry


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi head slopes (geometric; the extra heads of a non-power-of-two
    count interleave the next power's slopes), as BLOOM and MPT define them."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest != num_heads:
        extra_base = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        n_extra = num_heads - closest
        slopes += [extra_base ** (2 * i + 1) for i in range(n_extra)]
    return torch.tensor(slopes, dtype=torch.float32)


class PagedAttention(nn.Module):
    """Multi-head (grouped-query) attention reading K/V through block tables."""

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        alibi: bool = False,
        sliding_window: int | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.group = num_heads // num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        slopes = alibi_slopes(num_heads) if alibi else None
        self.register_buffer("alibi_slopes", slopes, persistent=False)
        self.backend: AttentionBackend | None = None

    def geometry(self) -> LayerGeometry:
        return LayerGeometry(
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.scale,
            self.alibi_slopes,
            self.sliding_window,
        )

    def bind_cache(self, cache: LayerCache) -> None:
        """Attach this layer's views of the paged cache and choose its backend
        (once: the cache's device and dtype are now known)."""
        self.backend = select_backend(self.geometry(), cache)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext
    ) -> torch.Tensor:
        # q: [T, Hq, D]; k, v: [T, Hkv, D] -> [T, Hq * D]
        backend = self.backend
        if backend is None:
            raise RuntimeError("attention layer used before its cache was bound")
        backend.write(k, v, ctx)
        if ctx.decode is not None and not ctx.prefills and ctx.decode.num_rows == q.shape[0]:
            # A decode-only step: the kernel's output is the layer's (no copy).
            return backend.decode(q, ctx.decode, ctx).flatten(1)
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        if ctx.decode is not None:  # the batch's first rows
            rows = slice(0, ctx.decode.num_rows)
            out[rows] = backend.decode(q[rows], ctx.decode, ctx)
        if ctx.prefills:
            backend.prefill_all(q, k, v, ctx, out)
        return out.flatten(1)
