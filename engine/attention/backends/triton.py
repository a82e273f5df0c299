"""The Triton backend: paged attention kernels of our own on CUDA.

Decode reads K/V in place through the block tables and, for h2o/keyformer
rows, adds each key's score in the same launch; all prompt chunks of a step
go through one varlen launch per layer that reads the cache in place and
adds the scored chunks' column sums tile by tile, never holding a
[heads, queries, keys] tensor. The default on CUDA (Triton ships with
torch's CUDA wheels); on a CPU only in Triton's interpreter
(TRITON_INTERPRET=1), which is how the tests run it.
"""

import torch

from engine.attention.backends.sdpa import TorchBackend
from engine.attention.context import AttentionContext, DecodeBatch, PrefillSpan
from engine.attention.geometry import LayerCache, LayerGeometry
from engine.kernels.triton.decode import DecodeScoreArgs, paged_decode_attention
from engine.kernels.triton.prefill import PrefillScoreArgs, paged_prefill_attention
from kv_manager.scoring import gumbel_table


class TritonBackend(TorchBackend):
    """Decode and the step's prompt chunks in Triton; the cache write (and a
    single chunk asked for on its own, FlashInfer's fallback) stay torch's."""

    name = "triton"

    def __init__(self, geometry: LayerGeometry, cache: LayerCache) -> None:
        if geometry.needs_key_positions:
            raise ValueError("the Triton kernels measure keys by slot: no ALiBi or sliding window")
        super().__init__(geometry, cache)

    def decode(self, q: torch.Tensor, batch: DecodeBatch, ctx: AttentionContext) -> torch.Tensor:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        scores = None
        if batch.scoring is not None:
            scores = ctx.masks.get("triton_decode_scores")
            if scores is None:  # the step's first layer; the others reuse it
                scores = ctx.masks["triton_decode_scores"] = _decode_score_columns(batch)
            scores = DecodeScoreArgs(
                score_cache=self.cache.scores, pos_cache=self.cache.positions,
                layer=self.cache.layer_idx, noise_table=gumbel_table(q.device), **scores,
            )  # fmt: skip
        paged_decode_attention(
            out, q.contiguous(), self.cache.k, self.cache.v, batch.block_tables,
            batch.num_keys, self.geo.scale, scores=scores,
        )  # fmt: skip
        return out

    def prefill_all(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        ctx: AttentionContext,
        out: torch.Tensor,
    ) -> None:
        """All chunks in one launch over the rows after the decodes (their
        K/V are in the cache already: the layer wrote them first)."""
        meta = ctx.masks.get("triton_prefill")
        if meta is None:  # the step's first layer; the others reuse it
            meta = ctx.masks["triton_prefill"] = _prefill_columns(ctx.prefills, q.device)
        first = ctx.prefills[0].token_start
        rows = slice(first, first + meta["num_rows"])
        scores = None
        if meta["scores"] is not None:
            scores = PrefillScoreArgs(
                score_cache=self.cache.scores, pos_cache=self.cache.positions,
                layer=self.cache.layer_idx, noise_table=gumbel_table(q.device), **meta["scores"],
            )  # fmt: skip
        chunk_out = torch.empty_like(q[rows], memory_format=torch.contiguous_format)
        paged_prefill_attention(
            chunk_out, q[rows], self.cache.k, self.cache.v, meta["cu_seqlens"],
            meta["slot_start"], meta["block_tables"], self.geo.scale, scores=scores,
            max_seqlen_q=meta["max_rows"],
        )  # fmt: skip
        out[rows] = chunk_out


def _decode_score_columns(batch: DecodeBatch) -> dict[str, torch.Tensor]:
    """The scoring rows' values spread over the whole decode batch: the
    kernel reads one entry per row and skips the inactive ones."""
    s, B = batch.scoring, batch.num_rows
    dev = batch.num_keys.device

    def spread(values: torch.Tensor, fill, dtype: torch.dtype) -> torch.Tensor:
        column = torch.full((B,), fill, dtype=dtype, device=dev)
        column[s.rows] = values.to(dtype)
        return column

    return {
        "active": spread(torch.ones_like(s.rows, dtype=torch.bool), False, torch.bool),
        "tau": spread(s.tau, 1.0, torch.float32),
        "seed": spread(s.seed, 0, torch.int64),
        "use_noise": spread(s.gumbel, False, torch.bool),
        "query_pos": spread(s.query_positions, 0, torch.int64),
    }


def _prefill_columns(spans: list[PrefillSpan], device: torch.device) -> dict:
    """The step's chunks as the varlen kernel reads them (made once a step)."""
    cu = [0]
    for s in spans:
        cu.append(cu[-1] + s.num_tokens)
    width = max(len(s.blocks) for s in spans)
    tables = [s.blocks + [0] * (width - len(s.blocks)) for s in spans]

    def column(values: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=device)

    scored = any(s.score is not None for s in spans)
    return {
        "num_rows": cu[-1],
        "max_rows": max(s.num_tokens for s in spans),
        "cu_seqlens": column(cu, torch.int32),
        "slot_start": column([s.slot_start for s in spans], torch.int32),
        "block_tables": column(tables, torch.int32),
        "scores": _prefill_score_columns(spans, column) if scored else None,
    }


def _prefill_score_columns(spans: list[PrefillSpan], column) -> dict[str, torch.Tensor]:
    """Per chunk: whether it scores, its seed and noise; per query row: its
    temperature and position."""
    taus = [
        s.score.tau_at(s.query_positions).float()
        if s.score is not None
        else torch.ones_like(s.query_positions, dtype=torch.float32)
        for s in spans
    ]
    return {
        "active": column([s.score is not None for s in spans], torch.bool),
        "seed": column([s.score.seed if s.score else 0 for s in spans], torch.int64),
        "use_noise": column([bool(s.score and s.score.gumbel) for s in spans], torch.bool),
        "tau": torch.cat(taus),
        "query_pos": torch.cat([s.query_positions for s in spans]),
        "score_from": column([s.score.score_from if s.score else 0 for s in spans], torch.int64),
    }
