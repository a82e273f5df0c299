"""Attention over the paged KV cache: write new K/V by slot, read by block table.

NOTE: K is stored after RoPE, and attention is independent per head, so the
order of tokens in slots does not matter to the math; only the mask (causal,
sliding window) and ALiBi need each key's original position, which the
context supplies.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from engine.context import AttentionContext, PrefillSpan


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
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        slopes = alibi_slopes(num_heads) if alibi else None
        self.register_buffer("alibi_slopes", slopes, persistent=False)
        # Bound by the model runner once memory is sized: [num_blocks, block_size, Hkv, D]
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext
    ) -> torch.Tensor:
        # q: [T, Hq, D]; k, v: [T, Hkv, D] -> [T, Hq * D]
        self.k_cache.view(-1, self.num_kv_heads, self.head_dim)[ctx.slot_mapping] = k
        self.v_cache.view(-1, self.num_kv_heads, self.head_dim)[ctx.slot_mapping] = v
        out = torch.empty_like(q)
        for i, span in enumerate(ctx.prefills):
            rows = slice(span.token_start, span.token_start + span.num_tokens)
            out[rows] = self._prefill(q[rows], k[rows], v[rows], span, ctx, i)
        if ctx.decode is not None:
            d = ctx.decode
            keys, values = self._read(d.block_tables)
            mask = self._mask(
                ctx, "decode", d.query_positions.unsqueeze(1), d.key_positions, d.key_valid, q.dtype
            )
            out[d.rows] = self._sdpa(q[d.rows].unsqueeze(1), keys, values, mask).squeeze(1)
        return out.flatten(1)

    def _read(self, block_tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, nb] block ids -> K, V [B, nb * block_size, Hkv, D].

        Gathers whole blocks (contiguous runs) rather than single slots."""
        keys = self.k_cache[block_tables].flatten(1, 2)
        values = self.v_cache[block_tables].flatten(1, 2)
        return keys, values

    def _prefill(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        span: PrefillSpan,
        ctx: AttentionContext,
        index: int,
    ) -> torch.Tensor:
        # q: [n, Hq, D]; k, v: [n, Hkv, D] (this chunk's own) -> [n, Hq, D]
        if span.block_table is None and self.alibi_slopes is None and self.sliding_window is None:
            return self._sdpa(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), None).squeeze(0)
        if span.block_table is not None:
            keys, values = self._read(span.block_table.unsqueeze(0))
            k, v = keys[0, : span.num_keys], values[0, : span.num_keys]
        mask = self._mask(
            ctx,
            ("prefill", index),
            span.query_positions.unsqueeze(0),
            span.key_positions.unsqueeze(0),
            None,
            q.dtype,
        )
        return self._sdpa(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), mask).squeeze(0)

    def _mask(
        self,
        ctx: AttentionContext,
        group: object,
        q_pos: torch.Tensor,
        k_pos: torch.Tensor,
        k_valid: torch.Tensor | None,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """Boolean mask, or additive ALiBi bias, [B, 1 or Hq, Lq, Lk]; built once a step."""
        key = (group, self.sliding_window, self.alibi_slopes is not None)
        mask = ctx.masks.get(key)
        if mask is None:
            mask = self._build_mask(q_pos, k_pos, k_valid, dtype)
            ctx.masks[key] = mask
        return mask

    def _build_mask(
        self,
        q_pos: torch.Tensor,
        k_pos: torch.Tensor,
        k_valid: torch.Tensor | None,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        # q_pos: [B, Lq]; k_pos, k_valid: [B, Lk]
        allowed = k_pos.unsqueeze(1) <= q_pos.unsqueeze(2)  # [B, Lq, Lk]
        if self.sliding_window is not None:
            allowed &= k_pos.unsqueeze(1) > q_pos.unsqueeze(2) - self.sliding_window
        if k_valid is not None:
            allowed &= k_valid.unsqueeze(1)
        mask = allowed.unsqueeze(1)  # [B, 1, Lq, Lk]
        if self.alibi_slopes is None:
            return mask
        # slope * (key - query position): softmax ignores a per-row shift, so
        # this equals HF BLOOM's slope * key position, but stays small near
        # the diagonal; absolute biases in bf16 round by up to 2 at position 1000.
        distance = (k_pos.unsqueeze(1) - q_pos.unsqueeze(2)).unsqueeze(1)  # [B, 1, Lq, Lk]
        bias = self.alibi_slopes.view(1, -1, 1, 1) * distance  # [B, Hq, Lq, Lk] float32
        return bias.to(dtype).masked_fill(~mask, float("-inf"))

    def _sdpa(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        # q: [B, Lq, Hq, D]; k, v: [B, Lk, Hkv, D] -> [B, Lq, Hq, D]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask,
            is_causal=mask is None,
            scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        return out.transpose(1, 2)
