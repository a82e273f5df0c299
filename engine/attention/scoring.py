"""Eviction scoring on the attention side: which sequences score, the
temperature schedule, and the torch form of the score accumulation.

What a policy adds to a key's score (softmax of the logits, with Keyformer's
Gumbel noise and temperature) is defined once in `kv_manager.scoring`; the
C++ kernels (engine/kernels/csrc/) compute the same sums in place. Here is
what every backend shares: the per-request `ScoreSpec`, the tau schedule,
and the plain-torch accumulation the backends without a fused kernel use.
"""

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from engine.attention.geometry import LayerCache, LayerGeometry
from kv_manager.policies import EvictionPolicy, HeavyHitterPolicy, KVPolicySettings
from kv_manager.scoring import gumbel_noise, step_scores

if TYPE_CHECKING:
    from engine.attention.context import DecodeScoring, PrefillSpan

# Prompt queries scored at once: bounds the [heads, queries, keys] logits.
SCORE_QUERY_CHUNK = 128


def tau_schedule(
    positions: torch.Tensor, prompt_len: torch.Tensor | int, tau_init, tau_slope
) -> torch.Tensor:
    """Keyformer's temperature of a query at `positions`: tau_init through the
    prompt, then rising by tau_slope per generated token (keyformer.md).
    Any argument may be a tensor (a batch of rows) or a number."""
    return tau_init + (positions - prompt_len + 1).clamp(min=0) * tau_slope


@dataclass
class ScoreSpec:
    """How a sequence's per-slot eviction scores are computed (h2o, keyformer)."""

    seed: int
    gumbel: bool  # Keyformer's noise; False for H2O
    prompt_len: int
    tau_init: float
    tau_slope: float
    # Queries at positions below it add nothing (an observation window,
    # KVPolicySettings.window_start); 0: every query scores.
    score_from: int = 0

    @classmethod
    def for_policy(
        cls,
        settings: KVPolicySettings,
        policy: EvictionPolicy,
        seed: int,
        prompt_len: int,
        max_tokens: int,
        score_from: int = 0,
    ) -> "ScoreSpec | None":
        """The spec of a request under `policy` (None: it needs no scores).
        Keyformer's tau rises from tau_init to tau_end over max_tokens steps."""
        if not isinstance(policy, HeavyHitterPolicy):
            return None
        if not policy.uses_gumbel:
            return cls(seed, False, prompt_len, 1.0, 0.0, score_from)
        slope = (settings.tau_end - settings.tau_init) / max(max_tokens, 1)
        return cls(seed, True, prompt_len, settings.tau_init, slope, score_from)

    def tau_at(self, positions: torch.Tensor) -> torch.Tensor:
        """The temperature of queries at `positions` (any shape)."""
        return tau_schedule(positions, self.prompt_len, self.tau_init, self.tau_slope)


def decode_logits(geo: LayerGeometry, q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Scaled q.k in float32: q [b, Hq, D], keys [b, L, Hkv, D] -> [b, Hkv, G, L]."""
    qs = q.float().view(q.shape[0], geo.num_kv_heads, geo.group, -1)
    return torch.einsum("bhgd,blhd->bhgl", qs, keys.float()) * geo.scale


def add_decode_scores(
    geo: LayerGeometry,
    cache: LayerCache,
    logits: torch.Tensor,
    k_pos: torch.Tensor,
    s: "DecodeScoring",
) -> None:
    """Add a decode step's scores for the scoring rows `s` (a DecodeScoring).
    logits: their scaled q.k [b, Hkv, G, L] (float32); k_pos: key positions [b, L, Hkv]."""
    b, L = s.rows.shape[0], logits.shape[-1]
    H, G = geo.num_kv_heads, geo.group
    k_pos = k_pos.transpose(1, 2).unsqueeze(2)  # [b, Hkv, 1, L]
    q_pos = s.query_positions.view(b, 1, 1, 1)
    if geo.alibi_slopes is not None:
        logits = logits + geo.alibi_slopes.view(1, H, G, 1) * (k_pos - q_pos)
    allowed = s.key_valid.view(b, 1, 1, L)
    if geo.sliding_window is not None:
        allowed = allowed & (k_pos > q_pos - geo.sliding_window)
    logits = logits.masked_fill(~allowed, float("-inf"))
    head = torch.arange(H * G, device=logits.device).view(1, H, G, 1)
    noise = gumbel_noise(s.seed.view(b, 1, 1, 1), cache.layer_idx, head, q_pos, k_pos)
    noise = noise * s.gumbel.view(b, 1, 1, 1)
    contrib = step_scores(logits, s.tau.view(b, 1, 1, 1), noise).sum(2)  # [b, Hkv, L]
    cache.add_scores(s.key_slots, contrib.transpose(1, 2))


def add_prompt_scores(
    geo: LayerGeometry,
    cache: LayerCache,
    q: torch.Tensor,
    k: torch.Tensor,
    k_pos: torch.Tensor,
    span: "PrefillSpan",
) -> None:
    """Accumulate a prompt chunk's scores (a PrefillSpan `span`) over query
    chunks, so memory stays bounded. q: [n, Hq, D]; k: [S, Hkv, D]; k_pos: [1, S, Hkv]."""
    spec: ScoreSpec = span.score
    H, G, S = geo.num_kv_heads, geo.group, span.num_keys
    dev = q.device
    # Contiguous once: each query chunk's matmul reads a column range of it.
    keys = k.float().permute(1, 2, 0).contiguous()  # [Hkv, D, S]
    kp = k_pos[0].transpose(0, 1).view(H, 1, 1, S)  # [Hkv, 1, 1, S]
    head = torch.arange(H * G, device=dev).view(H, G, 1, 1)
    seed = torch.tensor(spec.seed, dtype=torch.int64, device=dev)
    k_slot = torch.arange(S, device=dev)
    total = torch.zeros(H, S, dtype=torch.float32, device=dev)
    for start, c, logits in prompt_logits(geo, q, keys, span, causal_cut=False):
        q_pos = span.query_positions[start : start + c].view(1, 1, c, 1)
        if geo.alibi_slopes is not None:
            logits = logits + geo.alibi_slopes.view(H, G, 1, 1) * (kp - q_pos)
        q_slot = torch.arange(start, start + c, device=dev) + span.slot_start
        allowed = (k_slot.view(1, -1) <= q_slot.view(-1, 1)).view(1, 1, c, S)
        if geo.sliding_window is not None:
            allowed = allowed & (kp > q_pos - geo.sliding_window)
        logits = logits.masked_fill(~allowed, float("-inf"))
        noise = gumbel_noise(seed, cache.layer_idx, head, q_pos, kp) if spec.gumbel else None
        probs = step_scores(logits, spec.tau_at(q_pos), noise)
        if spec.score_from > 0:  # an observation window: the rows before it add nothing
            probs = probs * (q_pos >= spec.score_from)
        total += probs.sum(dim=(1, 2))
    cache.add_scores(span.key_slots, total.transpose(0, 1))


def prompt_logits(
    geo: LayerGeometry, q: torch.Tensor, keys: torch.Tensor, span: "PrefillSpan", causal_cut: bool
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Scaled float32 q.k of a chunk's queries, SCORE_QUERY_CHUNK at a time
    (memory stays bounded): yields (first query, count c, logits [Hkv, G, c, S']).
    keys: [Hkv, D, S]. With causal_cut, S' stops at the last key the chunk's
    last query sees, so most of the masked half is never computed."""
    H, G = geo.num_kv_heads, geo.group
    # The scale goes on the queries (c x D) rather than the logits (c x S).
    scaled = q.float() * geo.scale
    for start in range(0, span.num_tokens, SCORE_QUERY_CHUNK):
        qc = scaled[start : start + SCORE_QUERY_CHUNK]  # [c, Hq, D]
        c = qc.shape[0]
        width = span.slot_start + start + c if causal_cut else span.num_keys
        qs = qc.view(c, H, G, -1).permute(1, 2, 0, 3)  # [Hkv, G, c, D]
        yield start, c, torch.matmul(qs, keys[:, :, :width].unsqueeze(1))
