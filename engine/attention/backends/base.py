"""The calls every attention backend offers the attention layer."""

import torch

from engine.attention.context import AttentionContext, DecodeBatch, PrefillSpan
from engine.attention.geometry import LayerCache, LayerGeometry


class AttentionBackend:
    """Attention for one layer over its paged cache.

    One instance per layer, chosen once when the cache is bound
    (`engine.attention.backends.select_backend`). A call scores too when its
    batch asks for it: `DecodeBatch.scoring` / `PrefillSpan.score` is set.
    """

    name = "base"

    def __init__(self, geometry: LayerGeometry, cache: LayerCache) -> None:
        self.geo = geometry
        self.cache = cache

    def write(self, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> None:
        """Store the step's new K, V [T, Hkv, D] at ctx.slot_mapping."""
        raise NotImplementedError

    def decode(self, q: torch.Tensor, batch: DecodeBatch, ctx: AttentionContext) -> torch.Tensor:
        """One new query per sequence, q [B, Hq, D] -> [B, Hq, D]."""
        raise NotImplementedError

    def prefill(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        span: PrefillSpan,
        ctx: AttentionContext,
        index: int,
    ) -> torch.Tensor:
        """A prompt chunk (the step's `index`-th), causal over everything
        cached before it. q [n, Hq, D]; k, v: its own [n, Hkv, D] -> [n, Hq, D]."""
        raise NotImplementedError

    def prefill_all(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        ctx: AttentionContext,
        out: torch.Tensor,
    ) -> None:
        """Every prompt chunk of the step into its rows of `out` (q, k, v, out:
        the whole batch's rows). One chunk at a time here; a backend with a
        varlen kernel does them in one launch."""
        for i, span in enumerate(ctx.prefills):
            rows = slice(span.token_start, span.token_start + span.num_tokens)
            out[rows] = self.prefill(q[rows], k[rows], v[rows], span, ctx, i)


def scoring_rows(t: torch.Tensor, scoring) -> torch.Tensor:
    """The scoring rows of a decode-batch tensor (no copy when that is all of them)."""
    return t if scoring.all_rows else t[scoring.rows]


def span_key_positions(cache: LayerCache, span: PrefillSpan) -> torch.Tensor:
    """[1, S, Hkv] positions of all keys a prefill chunk attends to."""
    own = span.query_positions.view(1, -1, 1).expand(1, -1, cache.num_kv_heads)
    if span.block_table is None:
        return own
    cached = cache.read_positions(span.block_table.unsqueeze(0))[:, : span.slot_start]
    return torch.cat([cached, own], dim=1)


def span_keys(
    cache: LayerCache, k: torch.Tensor, v: torch.Tensor, span: PrefillSpan
) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V [S, Hkv, D] a chunk attends to: its own when it is a whole fresh
    prompt, else everything cached through it, read from the cache."""
    if span.block_table is None:
        return k, v
    keys, values = cache.read(span.block_table.unsqueeze(0))
    return keys[0, : span.num_keys], values[0, : span.num_keys]
