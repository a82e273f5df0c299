"""The FlashInfer backend: its paged kernels read K/V in place on CUDA.

FlashInfer serves full attention. It returns no attention probabilities, so
a step that scores keys (h2o, keyformer) goes whole to the Triton backend it
wraps on CUDA, whose kernels attend and score in one pass; over a backend
without such kernels, scoring reads the keys and adds scores in torch. Where
FlashInfer cannot plan a step (or a fresh prompt attends only to its own
K/V), the call goes to the wrapped backend too.
"""

import torch

from engine.attention import flashinfer as library
from engine.attention import scoring
from engine.attention.backends.base import AttentionBackend, scoring_rows, span_key_positions
from engine.attention.backends.sdpa import TorchBackend
from engine.attention.context import AttentionContext, DecodeBatch, PrefillSpan


class FlashInferBackend(AttentionBackend):
    name = "flashinfer"

    def __init__(self, fallback: TorchBackend) -> None:
        super().__init__(fallback.geo, fallback.cache)
        self.fallback = fallback

    def _usable(self, q: torch.Tensor) -> bool:
        """False from the first failed plan on: the fallback runs from then."""
        return library.available(q, self.geo.head_dim)

    @property
    def _fallback_scores_in_one_pass(self) -> bool:
        """The wrapped backend attends and scores in one kernel (Triton)."""
        return self.fallback.name == "triton"

    def prefill_all(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        ctx: AttentionContext,
        out: torch.Tensor,
    ) -> None:
        if self._fallback_scores_in_one_pass and any(s.score for s in ctx.prefills):
            self.fallback.prefill_all(q, k, v, ctx, out)
        else:
            super().prefill_all(q, k, v, ctx, out)

    def write(self, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> None:
        self.fallback.write(k, v, ctx)

    def decode(self, q: torch.Tensor, batch: DecodeBatch, ctx: AttentionContext) -> torch.Tensor:
        """Planned by the step's first layer; every layer runs with that plan."""
        scored_elsewhere = batch.scoring is not None and self._fallback_scores_in_one_pass
        if scored_elsewhere or not self._usable(q):
            return self.fallback.decode(q, batch, ctx)
        geo, c = self.geo, self.cache
        if "flashinfer_decode" not in ctx.masks:
            ctx.masks["flashinfer_decode"] = library.plan_decode(
                batch.block_tables, batch.num_keys, c.block_size, geo.shape, geo.scale, q.dtype
            )
        wrapper = ctx.masks["flashinfer_decode"]
        if wrapper is None:
            return self.fallback.decode(q, batch, ctx)
        out = wrapper.run(q.contiguous(), (c.k, c.v))
        if batch.scoring is not None:
            s = batch.scoring
            keys, _ = c.read(s.block_tables)
            logits = scoring.decode_logits(geo, scoring_rows(q, s), keys)
            self.fallback.score_decode(logits, c.read_positions(s.block_tables), s)
        return out

    def prefill(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        span: PrefillSpan,
        ctx: AttentionContext,
        index: int,
    ) -> torch.Tensor:
        """A later chunk of a chunked prefill, read in place. A whole fresh
        prompt attends only to its own K/V and keeps the fallback's kernel."""
        if span.block_table is None or not self._usable(q):
            return self.fallback.prefill(q, k, v, span, ctx, index)
        geo, c = self.geo, self.cache
        key = ("flashinfer_prefill", index)
        if key not in ctx.masks:
            ctx.masks[key] = library.plan_prefill(
                index, span.block_table, span.num_tokens, span.num_keys,
                c.block_size, geo.shape, geo.scale, q.dtype,
            )  # fmt: skip
        wrapper = ctx.masks[key]
        if wrapper is None:
            return self.fallback.prefill(q, k, v, span, ctx, index)
        out = wrapper.run(q.contiguous(), (c.k, c.v))
        if span.score is not None:
            keys, _ = c.read(span.block_table.unsqueeze(0))
            k_pos = span_key_positions(c, span)
            scoring.add_prompt_scores(geo, c, q, keys[0, : span.num_keys], k_pos, span)
        return out
