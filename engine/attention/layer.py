"""Attention over the paged KV cache: write new K/V by slot, read by block table,
and, for sequences whose policy needs them, add this step's eviction scores.

NOTE: K is stored after RoPE and attention is independent per head, so the
order and identity of tokens in a head's slots do not matter to the math; only
ALiBi, sliding windows and Keyformer's noise need each key's original
position, which the cache keeps per (layer, head, slot). Causality is by slot:
every cached slot precedes the new tokens, which are appended in order.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import flashinfer as flashinfer_attention
from engine.attention.context import (
    AttentionContext,
    DecodeBatch,
    DecodeScoring,
    PrefillSpan,
    ScoreSpec,
)
from engine.kernels.cpu import (
    accumulate_scores,
    add_decode_scores,
    paged_decode_attention,
    prefill_attention,
    prefill_attention_scored,
    write_kv,
)
from kv_manager.scoring import gumbel_exp_table, gumbel_noise, gumbel_table, step_scores

# Prompt queries scored at once: bounds the [heads, queries, keys] logits.
SCORE_QUERY_CHUNK = 128


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


def _pick(t: torch.Tensor, scoring: DecodeScoring) -> torch.Tensor:
    """The scoring rows of a decode-batch tensor (no copy when that is all of them)."""
    return t if scoring.all_rows else t[scoring.rows]


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
        self.layer_idx = 0
        self.k_cache = self.v_cache = self.score_cache = self.pos_cache = torch.empty(0)

    def bind_cache(
        self,
        layer_idx: int,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        score_cache: torch.Tensor,
        pos_cache: torch.Tensor,
    ) -> None:
        """Attach this layer's views of the paged cache: [num_blocks, block_size, Hkv(, D)]."""
        self.layer_idx = layer_idx
        self.k_cache, self.v_cache = k_cache, v_cache
        self.score_cache, self.pos_cache = score_cache, pos_cache

    @property
    def _needs_key_positions(self) -> bool:
        return self.alibi_slopes is not None or self.sliding_window is not None

    @property
    def _shape(self) -> tuple[int, int, int]:
        return self.num_heads, self.num_kv_heads, self.head_dim

    def _use_flashinfer(self, q: torch.Tensor) -> bool:
        """FlashInfer's paged kernels, where installed and applicable. Not with
        ALiBi or a sliding window: FlashInfer measures both by slot, and after
        eviction a key's slot is no longer its position."""
        return not self._needs_key_positions and flashinfer_attention.available(q, self.head_dim)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext
    ) -> torch.Tensor:
        # q: [T, Hq, D]; k, v: [T, Hkv, D] -> [T, Hq * D]
        self._write(k, v, ctx)
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        if ctx.decode is not None:  # the batch's first rows
            rows = slice(0, ctx.decode.num_rows)
            out[rows] = self._decode(q[rows], ctx)
        for i, span in enumerate(ctx.prefills):
            rows = slice(span.token_start, span.token_start + span.num_tokens)
            out[rows] = self._prefill(q[rows], k[rows], v[rows], span, ctx, i)
        return out.flatten(1)

    def _write(self, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> None:
        H, D = self.num_kv_heads, self.head_dim
        slots = ctx.slot_mapping
        kernel = write_kv() if self._writes_in_one_op(k, v) else None
        if kernel is not None:
            kernel(
                self.k_cache, self.v_cache, self.pos_cache, self.score_cache,
                k, v, slots, ctx.positions,
            )  # fmt: skip
            return
        self.k_cache.view(-1, H, D)[slots] = k
        self.v_cache.view(-1, H, D)[slots] = v
        self.pos_cache.view(-1, H)[slots] = ctx.positions.to(torch.int32).unsqueeze(1)
        # A slot may be reused from a freed block: its score starts afresh.
        self.score_cache.view(-1, H)[slots] = 0.0

    def _writes_in_one_op(self, k: torch.Tensor, v: torch.Tensor) -> bool:
        """The C++ cache write applies: a float32 CPU cache, and K and V
        float32 with each token's heads contiguous (BLOOM's interleave theirs)."""
        D = self.head_dim
        return (
            k.device.type == "cpu"
            and self.k_cache.dtype == torch.float32
            and all(
                t.dtype == torch.float32 and t.stride(2) == 1 and t.stride(1) == D for t in (k, v)
            )
        )

    def _read(self, block_tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, nb] block ids -> K, V [B, nb * block_size, Hkv, D], by whole blocks."""
        # index_select copies whole rows; plain advanced indexing is several
        # times slower on CPU for the same gather.
        flat = block_tables.flatten()
        shape = (block_tables.shape[0], -1, self.num_kv_heads, self.head_dim)
        return (
            self.k_cache.index_select(0, flat).view(shape),
            self.v_cache.index_select(0, flat).view(shape),
        )

    def _read_positions(self, block_tables: torch.Tensor) -> torch.Tensor:
        """[B, nb] block ids -> key positions [B, nb * block_size, Hkv]."""
        flat = block_tables.flatten()
        positions = self.pos_cache.index_select(0, flat)
        return positions.view(block_tables.shape[0], -1, self.num_kv_heads).long()

    # -- decode --------------------------------------------------------------

    def _decode(self, q: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        # q: [B, Hq, D] -> [B, Hq, D]
        d = ctx.decode
        if self._use_flashinfer(q):
            out = self._decode_flashinfer(q, ctx)
            if out is not None:
                return out
        kernel = self._decode_kernel(q)
        if kernel is not None:
            return self._decode_in_place(kernel, q, d)
        keys, values = self._read(d.block_tables)
        k_pos = None
        if self._needs_key_positions or d.scoring is not None:
            k_pos = self._read_positions(d.block_tables)
        valid = d.key_valid.view(d.key_valid.shape[0], 1, 1, -1)  # [B, 1, 1, L]
        q_pos = d.query_positions.view(-1, 1)  # [B, 1]
        if self._needs_key_positions:
            mask = self._positional_mask(valid, q_pos, k_pos, q.dtype)
        else:
            mask = self._padding_bias(ctx, valid, q.dtype)
        out = self._sdpa(q.unsqueeze(1), keys, values, mask, causal=False).squeeze(1)
        if d.scoring is not None:
            s = d.scoring
            logits = self._decode_logits(_pick(q, s), _pick(keys, s))
            self._score_decode(logits, _pick(k_pos, s), s)
        return out

    def _decode_logits(self, q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Scaled q.k in float32: q [b, Hq, D], keys [b, L, Hkv, D] -> [b, Hkv, G, L]."""
        qs = q.float().view(q.shape[0], self.num_kv_heads, self.group, -1)
        return torch.einsum("bhgd,blhd->bhgl", qs, keys.float()) * self.scale

    def _decode_flashinfer(self, q: torch.Tensor, ctx: AttentionContext) -> torch.Tensor | None:
        """FlashInfer's paged decode, planned by the step's first layer (None if
        it could not plan). Its kernel returns no logits: scoring rows read keys."""
        d = ctx.decode
        if "flashinfer_decode" not in ctx.masks:
            ctx.masks["flashinfer_decode"] = flashinfer_attention.plan_decode(
                d.block_tables, d.num_keys, self.k_cache.shape[1], self._shape, self.scale, q.dtype
            )
        wrapper = ctx.masks["flashinfer_decode"]
        if wrapper is None:
            return None
        out = wrapper.run(q.contiguous(), (self.k_cache, self.v_cache))
        if d.scoring is not None:
            s = d.scoring
            keys, _ = self._read(s.block_tables)
            logits = self._decode_logits(_pick(q, s), keys)
            self._score_decode(logits, self._read_positions(s.block_tables), s)
        return out

    def _decode_kernel(self, q: torch.Tensor):
        """The C++ paged-decode kernel when it applies: CPU, float32, and no
        per-key positional terms (ALiBi and sliding windows take the torch path)."""
        if q.device.type != "cpu" or q.dtype != torch.float32 or self._needs_key_positions:
            return None
        return paged_decode_attention()

    def _decode_in_place(self, kernel, q: torch.Tensor, d: DecodeBatch) -> torch.Tensor:
        """Attention read straight from the paged cache: no per-step gather of
        K/V. Its C++ score op comes from the same library as the kernel."""
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        logits = q.new_empty(0)
        if d.scoring is not None:
            logits = q.new_empty(q.shape[0], self.num_heads, d.key_valid.shape[1])
        kernel(
            out,
            q.contiguous(),
            self.k_cache,
            self.v_cache,
            d.block_tables,
            d.num_keys,
            self.scale,
            logits,
        )
        if d.scoring is not None:
            # Scores go straight into the cache slots, positions read in place.
            s, H = d.scoring, self.num_kv_heads
            add_decode_scores()(
                self.score_cache.view(-1, H), _pick(logits, s).contiguous(),
                s.key_slots.view(s.rows.shape[0], -1), self.pos_cache.view(-1, H), s.num_keys,
                s.query_positions, s.tau, s.seed, s.gumbel, self.layer_idx, gumbel_table(q.device),
            )  # fmt: skip
        return out

    @staticmethod
    def _padding_bias(ctx: AttentionContext, valid: torch.Tensor, dtype: torch.dtype):
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

    def _score_decode(self, logits: torch.Tensor, k_pos: torch.Tensor, s: DecodeScoring) -> None:
        """Add this step's scores for the scoring rows. logits: their scaled
        q.k [b, Hkv, G, L] (float32); k_pos: their key positions [b, L, Hkv]."""
        b, L = s.rows.shape[0], logits.shape[-1]
        H, G = self.num_kv_heads, self.group
        kernel = self._score_kernel(logits)
        if kernel is not None:
            out = logits.new_zeros(b, H, G, L)
            kernel(
                out, logits.contiguous().view(b, H, G, 1, L), s.num_keys.view(b, 1),
                s.query_positions.view(b, 1), k_pos.contiguous(), s.tau.view(b, 1), s.seed,
                s.gumbel, self.layer_idx, gumbel_table(logits.device), logits.new_empty(0), False,
            )  # fmt: skip
            self._add_scores(s.key_slots, out.sum(2).transpose(1, 2))
            return
        k_pos = k_pos.transpose(1, 2).unsqueeze(2)  # [b, Hkv, 1, L]
        q_pos = s.query_positions.view(b, 1, 1, 1)
        if self.alibi_slopes is not None:
            logits = logits + self.alibi_slopes.view(1, H, G, 1) * (k_pos - q_pos)
        allowed = s.key_valid.view(b, 1, 1, L)
        if self.sliding_window is not None:
            allowed = allowed & (k_pos > q_pos - self.sliding_window)
        logits = logits.masked_fill(~allowed, float("-inf"))
        head = torch.arange(H * G, device=logits.device).view(1, H, G, 1)
        noise = gumbel_noise(s.seed.view(b, 1, 1, 1), self.layer_idx, head, q_pos, k_pos)
        noise = noise * s.gumbel.view(b, 1, 1, 1)
        contrib = step_scores(logits, s.tau.view(b, 1, 1, 1), noise).sum(2)  # [b, Hkv, L]
        self._add_scores(s.key_slots, contrib.transpose(1, 2))

    def _add_scores(self, slots: torch.Tensor, contrib: torch.Tensor) -> None:
        """score_cache[slot, head] += contrib[..., slot, head] (slots [N], contrib [..., Hkv])."""
        H = self.num_kv_heads
        self.score_cache.view(-1, H).index_put_((slots,), contrib.reshape(-1, H), accumulate=True)

    def _score_kernel(self, logits: torch.Tensor):
        """The C++ score accumulation when it applies: CPU, and no ALiBi or
        sliding window (those shape the logits per key; the torch path has them)."""
        if logits.device.type != "cpu" or self._needs_key_positions:
            return None
        return accumulate_scores()

    # -- prefill -------------------------------------------------------------

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
        if span.block_table is not None and self._use_flashinfer(q):
            out = self._prefill_flashinfer(q, span, ctx, index)
            if out is not None:
                return out
        if span.block_table is not None:
            keys, values = self._read(span.block_table.unsqueeze(0))
            k, v = keys[0, : span.num_keys], values[0, : span.num_keys]
        k_pos = None
        if self._needs_key_positions or span.score is not None:
            k_pos = self._span_key_positions(span)
        prefill_kernel = self._prefill_kernel(q)
        if prefill_kernel is not None and span.score is None:
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
            prefill_kernel(out, q, k, v, self.scale)
            return out
        if prefill_kernel is not None:  # its scored twin is in the same library
            return self._attend_and_score_in_tiles(q, k, v, k_pos, span)
        kernel = self._score_kernel(q) if span.score is not None else None
        if kernel is not None:
            return self._attend_and_score_prompt(kernel, q, k, v, k_pos, span)
        if span.block_table is None and not self._needs_key_positions:
            out = self._sdpa(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), None, causal=True)
            out = out.squeeze(0)
        else:
            causal = self._causal(ctx, index, span)  # [1, 1, n, S]
            q_pos = span.query_positions.view(1, -1)
            mask = self._positional_mask(causal, q_pos, k_pos, q.dtype)
            out = self._sdpa(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), mask).squeeze(0)
        if span.score is not None:
            self._score_prefill(q, k, k_pos, span)
        return out

    def _prefill_kernel(self, q: torch.Tensor):
        """The C++ causal prompt attention when it applies: CPU, float32, head
        size 64 or 128, and no per-key positional terms."""
        if q.device.type != "cpu" or q.dtype != torch.float32 or self._needs_key_positions:
            return None
        return prefill_attention() if self.head_dim in (64, 128) else None

    def _prefill_flashinfer(
        self, q: torch.Tensor, span: PrefillSpan, ctx: AttentionContext, index: int
    ) -> torch.Tensor | None:
        """A later chunk of a chunked prefill, read in place by FlashInfer (None
        if it could not plan). A whole fresh prompt attends only to its own
        K/V and keeps SDPA's flash kernel."""
        key = ("flashinfer_prefill", index)
        if key not in ctx.masks:
            ctx.masks[key] = flashinfer_attention.plan_prefill(
                index, span.block_table, span.num_tokens, span.num_keys,
                self.k_cache.shape[1], self._shape, self.scale, q.dtype,
            )  # fmt: skip
        wrapper = ctx.masks[key]
        if wrapper is None:
            return None
        out = wrapper.run(q.contiguous(), (self.k_cache, self.v_cache))
        if span.score is not None:
            keys, _ = self._read(span.block_table.unsqueeze(0))
            k_pos = self._span_key_positions(span)
            self._score_prefill(q, keys[0, : span.num_keys], k_pos, span)
        return out

    def _span_key_positions(self, span: PrefillSpan) -> torch.Tensor:
        """[1, S, Hkv] positions of all keys a prefill chunk attends to."""
        own = span.query_positions.view(1, -1, 1).expand(1, -1, self.num_kv_heads)
        if span.block_table is None:
            return own
        cached = self._read_positions(span.block_table.unsqueeze(0))[:, : span.slot_start]
        return torch.cat([cached, own], dim=1)

    def _causal(self, ctx: AttentionContext, index: int, span: PrefillSpan) -> torch.Tensor:
        key = ("prefill", index)
        mask = ctx.masks.get(key)
        if mask is None:
            dev = span.query_positions.device
            q_slot = torch.arange(span.num_tokens, device=dev) + span.slot_start
            k_slot = torch.arange(span.num_keys, device=dev)
            mask = (k_slot.view(1, -1) <= q_slot.view(-1, 1)).view(1, 1, span.num_tokens, -1)
            ctx.masks[key] = mask
        return mask

    def _score_prefill(
        self, q: torch.Tensor, k: torch.Tensor, k_pos: torch.Tensor, span: PrefillSpan
    ) -> None:
        """Accumulate prompt scores over query chunks, so memory stays bounded
        (the torch path: CUDA, ALiBi, sliding windows, no C++ kernels)."""
        spec: ScoreSpec = span.score
        H, G, S = self.num_kv_heads, self.group, span.num_keys
        # Contiguous once: each query chunk's matmul reads a column range of it.
        keys = k.float().permute(1, 2, 0).contiguous()  # [Hkv, D, S]
        kp = k_pos[0].transpose(0, 1).view(H, 1, 1, S)  # [Hkv, 1, 1, S]
        head = torch.arange(H * G, device=q.device).view(H, G, 1, 1)
        seed = torch.tensor(spec.seed, dtype=torch.int64, device=q.device)
        k_slot = torch.arange(S, device=q.device)
        total = torch.zeros(H, S, dtype=torch.float32, device=q.device)
        for start, c, logits in self._prompt_logits(q, keys, span, causal_cut=False):
            q_pos = span.query_positions[start : start + c].view(1, 1, c, 1)
            if self.alibi_slopes is not None:
                logits = logits + self.alibi_slopes.view(H, G, 1, 1) * (kp - q_pos)
            q_slot = torch.arange(start, start + c, device=q.device) + span.slot_start
            allowed = (k_slot.view(1, -1) <= q_slot.view(-1, 1)).view(1, 1, c, S)
            if self.sliding_window is not None:
                allowed = allowed & (kp > q_pos - self.sliding_window)
            logits = logits.masked_fill(~allowed, float("-inf"))
            noise = gumbel_noise(seed, self.layer_idx, head, q_pos, kp) if spec.gumbel else None
            total += step_scores(logits, spec.tau_at(q_pos), noise).sum(dim=(1, 2))
        self._add_scores(span.key_slots, total.transpose(0, 1))

    def _prompt_logits(
        self, q: torch.Tensor, keys: torch.Tensor, span: PrefillSpan, causal_cut: bool
    ):
        """Scaled float32 q.k of the chunk's queries, SCORE_QUERY_CHUNK at a time
        (memory stays bounded): yields (first query, count c, logits [Hkv, G, c, S']).
        keys: [Hkv, D, S]. With causal_cut, S' stops at the last key the chunk's
        last query sees, so most of the masked half is never computed."""
        H, G = self.num_kv_heads, self.group
        # The scale goes on the queries (c x D) rather than the logits (c x S).
        scaled = q.float() * self.scale
        for start in range(0, span.num_tokens, SCORE_QUERY_CHUNK):
            qc = scaled[start : start + SCORE_QUERY_CHUNK]  # [c, Hq, D]
            c = qc.shape[0]
            width = span.slot_start + start + c if causal_cut else span.num_keys
            qs = qc.view(c, H, G, -1).permute(1, 2, 0, 3)  # [Hkv, G, c, D]
            yield start, c, torch.matmul(qs, keys[:, :, :width].unsqueeze(1))

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
        spec: ScoreSpec = span.score
        dev = q.device
        out = torch.empty(q.shape, dtype=q.dtype, device=dev)
        scores = torch.zeros(self.num_kv_heads, span.num_keys, dtype=torch.float32, device=dev)
        q_pos = span.query_positions.contiguous()
        prefill_attention_scored()(
            out, scores, q, k, v, self.scale, q_pos, k_pos[0].contiguous(),
            spec.tau_at(q_pos).float().contiguous(), spec.seed, spec.gumbel, self.layer_idx,
            gumbel_table(dev), gumbel_exp_table(dev),
        )  # fmt: skip
        self._add_scores(span.key_slots, scores.transpose(0, 1))
        return out

    def _attend_and_score_prompt(
        self,
        kernel,
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
        spec: ScoreSpec = span.score
        H, G, S = self.num_kv_heads, self.group, span.num_keys
        dev = q.device
        keys = k.float().permute(1, 2, 0).contiguous()  # [Hkv, D, S]
        values = v.float().transpose(0, 1).contiguous().unsqueeze(1)  # [Hkv, 1, S, D]
        k_pos = k_pos.contiguous()
        seed = torch.tensor([spec.seed], dtype=torch.int64, device=dev)
        use_noise = torch.tensor([spec.gumbel], device=dev)
        scores = torch.zeros(1, H, G, S, dtype=torch.float32, device=dev)
        out = torch.empty_like(q)
        for start, c, logits in self._prompt_logits(q, keys, span, causal_cut=True):
            visible = logits.shape[-1]
            q_pos = span.query_positions[start : start + c]
            tau = spec.tau_at(q_pos)
            num_visible = torch.arange(1, c + 1, device=dev) + (span.slot_start + start)
            kernel(
                scores, logits.unsqueeze(0), num_visible.view(1, c), q_pos.view(1, c),
                k_pos[:, :visible], tau.float().view(1, c), seed, use_noise, self.layer_idx,
                gumbel_table(dev), gumbel_exp_table(dev), True,
            )  # fmt: skip
            chunk = torch.matmul(logits, values[:, :, :visible])  # [Hkv, G, c, D]
            out[start : start + c] = chunk.permute(2, 0, 1, 3).reshape(c, self.num_heads, -1)
        self._add_scores(span.key_slots, scores[0].sum(1).transpose(0, 1))
        return out

    # -- shared --------------------------------------------------------------

    def _positional_mask(
        self,
        allowed: torch.Tensor,
        q_pos: torch.Tensor,
        k_pos: torch.Tensor | None,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """Add the sliding window and ALiBi, which need per-head key positions.

        allowed: bool [B, 1, Lq, Lk]; q_pos: [B, Lq]; k_pos: [B, Lk, Hkv].
        Returns a bool mask or an additive float bias, [B, 1 or Hq, Lq, Lk].
        """
        if not self._needs_key_positions:
            return allowed
        kp = k_pos.permute(0, 2, 1).repeat_interleave(self.group, dim=1).unsqueeze(2)
        distance = kp - q_pos.unsqueeze(1).unsqueeze(3)  # [B, Hq, Lq, Lk]
        if self.sliding_window is not None:
            allowed = allowed & (distance > -self.sliding_window)
        if self.alibi_slopes is None:
            return allowed
        # slope * (key - query position): softmax ignores a per-row shift, so
        # this equals HF BLOOM's slope * key position, but stays small near
        # the diagonal; absolute biases in bf16 round by up to 2 at position 1000.
        bias = self.alibi_slopes.view(1, -1, 1, 1) * distance  # float32
        return bias.to(dtype).masked_fill(~allowed, float("-inf"))

    def _sdpa(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
        causal: bool = False,
    ) -> torch.Tensor:
        # q: [B, Lq, Hq, D]; k, v: [B, Lk, Hkv, D] -> [B, Lq, Hq, D]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask,
            is_causal=causal,
            scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        return out.transpose(1, 2)
