"""The Triton backend: paged attention kernels of our own on CUDA.

Decode reads K/V in place through the block tables and, for h2o/keyformer
rows, adds each key's score in the same launch. Prompt chunks take the torch
path until the varlen prefill kernel is wired in. The default on CUDA
(Triton ships with torch's CUDA wheels); on a CPU only in Triton's
interpreter (TRITON_INTERPRET=1), which is how the tests run it.
"""

import torch

from engine.attention.backends.sdpa import TorchBackend
from engine.attention.context import AttentionContext, DecodeBatch
from engine.attention.geometry import LayerCache, LayerGeometry
from engine.kernels.triton.decode import DecodeScoreArgs, paged_decode_attention
from kv_manager.scoring import gumbel_table


class TritonBackend(TorchBackend):
    """Decode in Triton; the cache write and prompt chunks stay torch's."""

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
