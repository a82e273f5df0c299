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

from engine.context import AttentionContext


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
        k_flat = self.k_cache.view(-1, self.num_kv_heads, self.head_dim)
        v_flat = self.v_cache.view(-1, self.num_kv_heads, self.head_dim)
        k_flat[ctx.slot_mapping] = k
        v_flat[ctx.slot_mapping] = v
        out = torch.empty_like(q)
        for span in ctx.prefills:
            rows = slice(span.token_start, span.token_start + span.num_tokens)
            if span.key_slots is None:
                keys, values = k[rows], v[rows]
            else:
                keys, values = k_flat[span.key_slots], v_flat[span.key_slots]
            out[rows] = self._attend(
                q[rows].unsqueeze(0),
                keys.unsqueeze(0),
                values.unsqueeze(0),
                span.query_positions.unsqueeze(0),
                span.key_positions.unsqueeze(0),
                None,
            ).squeeze(0)
        if ctx.decode_rows is not None:
            out[ctx.decode_rows] = self._attend(
                q[ctx.decode_rows].unsqueeze(1),
                k_flat[ctx.decode_key_slots],
                v_flat[ctx.decode_key_slots],
                ctx.decode_query_positions.unsqueeze(1),
                ctx.decode_key_positions,
                ctx.decode_key_valid,
            ).squeeze(1)
        return out.flatten(1)

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        q_pos: torch.Tensor,
        k_pos: torch.Tensor,
        k_valid: torch.Tensor | None,
    ) -> torch.Tensor:
        # q: [B, Lq, Hq, D]; k, v: [B, Lk, Hkv, D]; q_pos: [B, Lq]; k_pos, k_valid: [B, Lk]
        allowed = k_pos.unsqueeze(1) <= q_pos.unsqueeze(2)  # [B, Lq, Lk]
        if self.sliding_window is not None:
            allowed &= k_pos.unsqueeze(1) > q_pos.unsqueeze(2) - self.sliding_window
        if k_valid is not None:
            allowed &= k_valid.unsqueeze(1)
        mask = allowed.unsqueeze(1)  # [B, 1, Lq, Lk]
        if self.alibi_slopes is not None:
            bias = self.alibi_slopes.view(1, -1, 1, 1) * k_pos.view(k_pos.shape[0], 1, 1, -1)
            mask = bias.to(q.dtype).masked_fill(~mask, float("-inf"))
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask,
            scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        return out.transpose(1, 2)
