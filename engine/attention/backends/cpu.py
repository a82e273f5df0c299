"""The CPU backend: the C++ kernels of engine/kernels/csrc/.

Chosen for CPU caches of models without ALiBi or a sliding window, where the
kernels built. In float32 and bfloat16 the cache write is one op, and decode
reads K/V in place (float32 arithmetic either way) and adds its scores into
the cache slots in the same library. A prompt of head size 64 or 128 runs
one tiled pass that gives the output and the scores from one exp, in
float32 or bfloat16 (float32 logits, softmax and scores either way). Other
dtypes, and other head sizes, keep torch's attention with the C++ score
accumulation.
"""

import torch

from engine.attention import scoring
from engine.attention.backends.base import scoring_rows, span_key_positions, span_keys
from engine.attention.backends.sdpa import TorchBackend
from engine.attention.context import AttentionContext, DecodeBatch, PrefillSpan
from engine.attention.geometry import LayerCache, LayerGeometry
from engine.kernels import cpu as kernels
from kv_manager.scoring import gumbel_exp_table, gumbel_table

# Head sizes the tiled prompt kernels are built for.
TILED_HEAD_DIMS = (64, 128)
# Cache dtypes the decode and cache-write kernels take.
KERNEL_DTYPES = (torch.float32, torch.bfloat16)


class CpuBackend(TorchBackend):
    name = "cpu"

    def __init__(self, geometry: LayerGeometry, cache: LayerCache) -> None:
        if geometry.needs_key_positions:
            raise ValueError("the CPU kernels measure keys by slot: no ALiBi or sliding window")
        super().__init__(geometry, cache)
        self.ops = kernels.ops()
        self.dtype = cache.k.dtype
        self.in_place = self.dtype in KERNEL_DTYPES  # decode and write in C++
        self.tiled_prompt = self.in_place and geometry.head_dim in TILED_HEAD_DIMS

    # -- cache write ---------------------------------------------------------

    def write(self, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> None:
        if not self._writes_in_one_op(k, v):
            super().write(k, v, ctx)
            return
        c = self.cache
        self.ops.write_kv(
            k_cache=c.k, v_cache=c.v, pos_cache=c.positions, score_cache=c.scores,
            k=k, v=v, slots=ctx.slot_mapping, positions=ctx.positions,
        )  # fmt: skip

    def _writes_in_one_op(self, k: torch.Tensor, v: torch.Tensor) -> bool:
        """A float32 or bfloat16 cache, and K and V of its dtype with each
        token's heads contiguous (a fused QKV layout may interleave them)."""
        D = self.geo.head_dim
        return self.in_place and all(
            t.dtype == self.dtype and t.stride(2) == 1 and t.stride(1) == D for t in (k, v)
        )

    # -- decode --------------------------------------------------------------

    def decode(self, q: torch.Tensor, batch: DecodeBatch, ctx: AttentionContext) -> torch.Tensor:
        if not self.in_place or q.dtype != self.dtype:
            return super().decode(q, batch, ctx)
        # Attention read straight from the paged cache: no per-step gather.
        c, s = self.cache, batch.scoring
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        logits = q.new_empty(0, dtype=torch.float32)
        if s is not None:  # float32 in either dtype: the scores' softmax reads them
            L = batch.key_valid.shape[1]
            logits = q.new_empty(q.shape[0], self.geo.num_heads, L, dtype=torch.float32)
        self.ops.paged_decode_attention(
            out=out, q=_token_rows(q), k_cache=c.k, v_cache=c.v,
            block_tables=batch.block_tables, num_keys=batch.num_keys, scale=self.geo.scale,
            logits_out=logits,
        )  # fmt: skip
        if s is not None:
            # Scores go straight into the cache slots, positions read in place.
            H = self.geo.num_kv_heads
            self.ops.add_decode_scores(
                score_cache=c.scores.view(-1, H), logits=scoring_rows(logits, s).contiguous(),
                key_slots=s.key_slots.view(s.rows.shape[0], -1), pos_cache=c.positions.view(-1, H),
                num_keys=s.num_keys, query_pos=s.query_positions, tau=s.tau, seed=s.seed,
                use_noise=s.gumbel, layer=c.layer_idx, noise_table=gumbel_table(q.device),
            )  # fmt: skip
        return out

    def score_decode(self, logits: torch.Tensor, k_pos: torch.Tensor, s) -> None:
        b, L = s.rows.shape[0], logits.shape[-1]
        H, G = self.geo.num_kv_heads, self.geo.group
        out = logits.new_zeros(b, H, G, L)
        self.ops.accumulate_scores(
            out=out, logits=logits.contiguous().view(b, H, G, 1, L),
            num_visible=s.num_keys.view(b, 1), query_pos=s.query_positions.view(b, 1),
            key_pos=k_pos.contiguous(), tau=s.tau.view(b, 1), seed=s.seed, use_noise=s.gumbel,
            layer=self.cache.layer_idx, noise_table=gumbel_table(logits.device),
            exp_table=logits.new_empty(0), write_probs=False,
        )  # fmt: skip
        self.cache.add_scores(s.key_slots, out.sum(2).transpose(1, 2))

    # -- prefill -------------------------------------------------------------

    def prefill(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        span: PrefillSpan,
        ctx: AttentionContext,
        index: int,
    ) -> torch.Tensor:
        k, v = span_keys(self.cache, k, v, span)
        # The tiled kernels take q, k, v of the cache's dtype (float32 or bfloat16).
        tiled = self.tiled_prompt and all(t.dtype == self.dtype for t in (q, k, v))
        if span.score is None:
            if not tiled:
                return self.attend_prompt(q, k, v, None, span, ctx, index)
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
            self.ops.prefill_attention(out=out, q=q, k=k, v=v, scale=self.geo.scale)
            return out
        k_pos = span_key_positions(self.cache, span)
        if tiled:
            return self._attend_and_score_in_tiles(q, k, v, k_pos, span)
        return self._attend_and_score_prompt(q, k, v, k_pos, span)

    def _attend_and_score_in_tiles(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_pos: torch.Tensor,
        span: PrefillSpan,
    ) -> torch.Tensor:
        """A scored prompt chunk in one C++ pass (prefill_scored_cpu.cpp): the
        output and each key's score, from logits that never leave the tile.
        q: [n, Hq, D]; k, v: [S, Hkv, D]; k_pos: [1, S, Hkv]."""
        spec, dev = span.score, q.device
        out = torch.empty(q.shape, dtype=q.dtype, device=dev)
        scores = torch.zeros(self.geo.num_kv_heads, span.num_keys, dtype=torch.float32, device=dev)
        q_pos = span.query_positions.contiguous()
        self.ops.prefill_attention_scored(
            out=out, scores=scores, q=q, k=k, v=v, scale=self.geo.scale, query_pos=q_pos,
            key_pos=k_pos[0].contiguous(), tau=spec.tau_at(q_pos).float().contiguous(),
            seed=spec.seed, use_noise=spec.gumbel, layer=self.cache.layer_idx,
            noise_table=gumbel_table(dev), exp_table=gumbel_exp_table(dev),
            score_from=spec.score_from,
        )  # fmt: skip
        self.cache.add_scores(span.key_slots, scores.transpose(0, 1))
        return out

    def _attend_and_score_prompt(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_pos: torch.Tensor,
        span: PrefillSpan,
    ) -> torch.Tensor:
        """A scored prompt chunk's attention and scores from one set of logits
        (head sizes and dtypes the tiled kernel does not take).
        Per query chunk, the kernel adds the scores and turns the logits into
        probabilities in place, and P @ V is the output: the logits are made
        once, not once for attention and again for the scores. Each query
        chunk stops at its last visible key, so the masked half is never
        computed. q: [n, Hq, D]; k, v: [S, Hkv, D]; k_pos: [1, S, Hkv]."""
        spec, geo, dev = span.score, self.geo, q.device
        keys = k.float().permute(1, 2, 0).contiguous()  # [Hkv, D, S]
        values = v.float().transpose(0, 1).contiguous().unsqueeze(1)  # [Hkv, 1, S, D]
        k_pos = k_pos.contiguous()
        seed = torch.tensor([spec.seed], dtype=torch.int64, device=dev)
        use_noise = torch.tensor([spec.gumbel], device=dev)
        scores = torch.zeros(
            1, geo.num_kv_heads, geo.group, span.num_keys, dtype=torch.float32, device=dev
        )
        out = torch.empty_like(q)
        for start, c, logits in scoring.prompt_logits(geo, q, keys, span, causal_cut=True):
            visible = logits.shape[-1]
            q_pos = span.query_positions[start : start + c]
            num_visible = torch.arange(1, c + 1, device=dev) + (span.slot_start + start)
            self.ops.accumulate_scores(
                out=scores, logits=logits.unsqueeze(0), num_visible=num_visible.view(1, c),
                query_pos=q_pos.view(1, c), key_pos=k_pos[:, :visible],
                tau=spec.tau_at(q_pos).float().view(1, c), seed=seed, use_noise=use_noise,
                layer=self.cache.layer_idx, noise_table=gumbel_table(dev),
                exp_table=gumbel_exp_table(dev), write_probs=True, score_from=spec.score_from,
            )  # fmt: skip
            chunk = torch.matmul(logits, values[:, :, :visible])  # [Hkv, G, c, D]
            out[start : start + c] = chunk.permute(2, 0, 1, 3).reshape(c, geo.num_heads, -1)
        self.cache.add_scores(span.key_slots, scores[0].sum(1).transpose(0, 1))
        return out


def _token_rows(q: torch.Tensor) -> torch.Tensor:
    """q as the decode kernel reads it: each token's heads contiguous, the
    tokens any distance apart. A slice of the fused QKV projection already is;
    copying it cost 2.6% of a 64-sequence bfloat16 decode step."""
    B, Hq, D = q.shape
    heads_together = q.stride(2) == 1 and q.stride(1) == D
    if heads_together and (B == 1 or q.stride(0) >= Hq * D):
        return q
    return q.contiguous()
