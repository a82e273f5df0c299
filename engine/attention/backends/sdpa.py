"""The plain-torch backend: gathers K/V and runs torch's SDPA, scores in torch.

It runs anywhere: on CUDA (until the GPU kernels land), on a CPU without the
C++ kernels, and for every model with ALiBi or a sliding window, which need
each key's original position (the fused kernels measure by slot).
"""

import torch
import torch.nn.functional as F

from engine.attention import scoring
from engine.attention.backends.base import (
    AttentionBackend,
    scoring_rows,
    span_key_positions,
    span_keys,
)
from engine.attention.context import AttentionContext, DecodeBatch, PrefillSpan
from engine.attention.geometry import LayerGeometry


class TorchBackend(AttentionBackend):
    name = "torch"

    def write(self, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> None:
        self.cache.write(k, v, ctx.slot_mapping, ctx.positions)

    def decode(self, q: torch.Tensor, batch: DecodeBatch, ctx: AttentionContext) -> torch.Tensor:
        geo = self.geo
        keys, values = self.cache.read(batch.block_tables)
        k_pos = None
        if geo.needs_key_positions or batch.scoring is not None:
            k_pos = self.cache.read_positions(batch.block_tables)
        valid = batch.key_valid.view(batch.key_valid.shape[0], 1, 1, -1)  # [B, 1, 1, L]
        if geo.needs_key_positions:
            q_pos = batch.query_positions.view(-1, 1)  # [B, 1]
            mask = positional_mask(geo, valid, q_pos, k_pos, q.dtype)
        else:
            mask = padding_bias(ctx, valid, q.dtype)
        out = sdpa(geo, q.unsqueeze(1), keys, values, mask).squeeze(1)
        if batch.scoring is not None:
            s = batch.scoring
            logits = scoring.decode_logits(geo, scoring_rows(q, s), scoring_rows(keys, s))
            self.score_decode(logits, scoring_rows(k_pos, s), s)
        return out

    def score_decode(self, logits: torch.Tensor, k_pos: torch.Tensor, s) -> None:
        """Add a decode step's scores from its float32 logits [b, Hkv, G, L]."""
        scoring.add_decode_scores(self.geo, self.cache, logits, k_pos, s)

    def prefill(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        span: PrefillSpan,
        ctx: AttentionContext,
        index: int,
    ) -> torch.Tensor:
        geo = self.geo
        k, v = span_keys(self.cache, k, v, span)
        k_pos = None
        if geo.needs_key_positions or span.score is not None:
            k_pos = span_key_positions(self.cache, span)
        out = self.attend_prompt(q, k, v, k_pos, span, ctx, index)
        if span.score is not None:
            scoring.add_prompt_scores(geo, self.cache, q, k, k_pos, span)
        return out

    def attend_prompt(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_pos: torch.Tensor | None,
        span: PrefillSpan,
        ctx: AttentionContext,
        index: int,
    ) -> torch.Tensor:
        """Causal SDPA of a chunk over its keys k, v [S, Hkv, D]."""
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
        if span.block_table is None and not self.geo.needs_key_positions:
            return sdpa(self.geo, q, k, v, None, causal=True).squeeze(0)
        allowed = causal_mask(ctx, index, span)  # [1, 1, n, S]
        q_pos = span.query_positions.view(1, -1)
        mask = positional_mask(self.geo, allowed, q_pos, k_pos, q.dtype)
        return sdpa(self.geo, q, k, v, mask).squeeze(0)


def sdpa(
    geo: LayerGeometry,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool = False,
) -> torch.Tensor:
    """q: [B, Lq, Hq, D]; k, v: [B, Lk, Hkv, D] -> [B, Lq, Hq, D]."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        is_causal=causal,
        scale=geo.scale,
        enable_gqa=geo.num_heads != geo.num_kv_heads,
    )
    return out.transpose(1, 2)


def padding_bias(ctx: AttentionContext, valid: torch.Tensor, dtype: torch.dtype):
    """Additive 0 / -inf bias for padded keys, made once a step: SDPA would
    otherwise turn the boolean mask into one in every layer. None when no
    key is padding (all sequences equally long): SDPA is faster unmasked."""
    if "decode_padding" not in ctx.masks:
        bias = None
        if not bool(valid.all()):
            bias = torch.zeros(valid.shape, dtype=dtype, device=valid.device)
            bias.masked_fill_(~valid, float("-inf"))
        ctx.masks["decode_padding"] = bias
    return ctx.masks["decode_padding"]


def causal_mask(ctx: AttentionContext, index: int, span: PrefillSpan) -> torch.Tensor:
    """[1, 1, n, S] bool: query slot >= key slot; made once a step per chunk."""
    key = ("prefill", index)
    mask = ctx.masks.get(key)
    if mask is None:
        dev = span.query_positions.device
        q_slot = torch.arange(span.num_tokens, device=dev) + span.slot_start
        k_slot = torch.arange(span.num_keys, device=dev)
        mask = (k_slot.view(1, -1) <= q_slot.view(-1, 1)).view(1, 1, span.num_tokens, -1)
        ctx.masks[key] = mask
    return mask


def positional_mask(
    geo: LayerGeometry,
    allowed: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Add the sliding window and ALiBi, which need per-head key positions.

    allowed: bool [B, 1, Lq, Lk]; q_pos: [B, Lq]; k_pos: [B, Lk, Hkv].
    Returns a bool mask or an additive float bias, [B, 1 or Hq, Lq, Lk].
    """
    if not geo.needs_key_positions:
        return allowed
    kp = k_pos.permute(0, 2, 1).repeat_interleave(geo.group, dim=1).unsqueeze(2)
    distance = kp - q_pos.unsqueeze(1).unsqueeze(3)  # [B, Hq, Lq, Lk]
    if geo.sliding_window is not None:
        allowed = allowed & (distance > -geo.sliding_window)
    if geo.alibi_slopes is None:
        return allowed
    # slope * (key - query position): softmax ignores a per-row shift, so
    # this equals HF BLOOM's slope * key position, but stays small near
    # the diagonal; absolute biases in bf16 round by up to 2 at position 1000.
    bias = geo.alibi_slopes.view(1, -1, 1, 1) * distance  # float32
    return bias.to(dtype).masked_fill(~allowed, float("-inf"))
