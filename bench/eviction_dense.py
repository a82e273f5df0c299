"""A dense, vectorized measurement model of the KV eviction policies.

It runs greedy requests through the engine's own model weights, but swaps the
paged attention for a dense one: per layer, K/V of every token ever seen stay
in one tensor, and a `kept` mask per (kv-head, token) says which of them the
policy still holds. Nothing is dropped, so at each decode step it can compare
what the policy attends to with what full attention would attend to:

    mass = sum over kept tokens j of softmax(q . K_all)_j

with the ordinary (noise-free) softmax over ALL tokens of the sequence, the
current one included, per layer and query head. The query is the policy's own
(the model runs with eviction), so this is the share of full attention's
probability mass that lands on the tokens the policy reads at that step.

One prompt is prefilled once (every policy attends fully to its prompt; the
cut comes after), then all (policy, budget) runs of that prompt decode
together, one row each, so the model's weights are read once per step.

The policy rules are re-derived from /work/shared/keyformer.md, not imported
from kv_manager.policies, so a run doubles as an independent check of the
engine (its greedy tokens must equal the engine's):

- budget k = max(floor(n * kv_ratio), kv_min_tokens), capped by kv_max_tokens;
  the cut happens after the prompt pass and after every decode step;
- window: the newest k tokens; streaming: `sink_tokens` first tokens + newest;
- h2o / keyformer: the newest w = floor(k * recent_ratio) tokens plus the
  highest accumulated scores; a score is the softmax of each query's logits
  (h2o) or of (logits + Gumbel) / tau (keyformer, counter-based noise from
  kv_manager.scoring.gumbel_noise, tau rising linearly per generated token),
  summed over all queries and over the query heads of a kv-head;
- ties evict the older token; an evicted token never returns.

The score arithmetic follows engine/attention/layer.py (prompt queries in chunks of
SCORE_QUERY_CHUNK, float32 throughout), so accumulated scores agree with the
engine's up to float rounding. Only models without ALiBi or sliding windows
are supported (the embedded SmolLM2 is RoPE-only).
"""

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.attention.layer import PagedAttention
from engine.attention.scoring import SCORE_QUERY_CHUNK
from kv_manager.policies import KVPolicySettings
from kv_manager.scoring import gumbel_noise, step_scores

SCORED_POLICIES = ("h2o", "keyformer")
# Stands in for a +inf draw: g = -log(-log(u)) at u = 1 - 2**-25 (17.33), the
# largest draw of the float32 gumbel_noise that could return +inf; above every
# level of today's table.
GUMBEL_MAX = -math.log(-math.log1p(-(2.0**-25)))


def finite_gumbel_noise(
    seed: torch.Tensor,
    layer: int,
    head: torch.Tensor,
    query_pos: torch.Tensor,
    key_pos: torch.Tensor,
) -> torch.Tensor:
    """kv_manager.scoring.gumbel_noise, with any +inf replaced by GUMBEL_MAX.

    NOTE: today this returns gumbel_noise's draws unchanged, bit for bit.
    gumbel_noise reads Gumbel(0, 1) from a table of 2**16 finite levels
    (kv_manager/scoring.py, GUMBEL_TABLE_BITS), indexed by the top 16 bits of
    its hash; the largest level is about 11.8, so no draw is +inf. The guard
    dates from a gumbel_noise that computed u = (top + 0.5) / 2**24 from the
    hash's top 24 bits in float32, where the top draw rounded to u = 1 and
    g = +inf, and one +inf turned a whole (layer, kv-head) row of accumulated
    scores into NaN (H2O too: the engine multiplies the noise by its gumbel
    flag, and inf * 0 = NaN). It is kept so that `--engine-gumbel finite`
    would still mean "noise as specified" if the engine's noise changed again.
    """
    noise = gumbel_noise(seed, layer, head, query_pos, key_pos)
    return noise.masked_fill(torch.isinf(noise), GUMBEL_MAX)


# -- the prompt pass, shared by every run of one prompt ------------------------


@dataclass
class Prefill:
    """What the prompt pass leaves behind; the decode runs share it."""

    prompt: list[int]
    seed: int  # the request seed: keys Keyformer's noise
    keys: list[torch.Tensor]  # per layer [n, Hkv, D]
    values: list[torch.Tensor]
    scores: dict[str, torch.Tensor]  # "h2o" / "keyformer" -> [L, Hkv, n] prompt scores
    first_token: int  # greedy token after the prompt (full attention, no eviction yet)


@torch.inference_mode()
def run_prefill(
    model: torch.nn.Module, prompt: Sequence[int], seed: int, tau_init: float
) -> Prefill:
    """One full-attention pass over the prompt, scoring it for h2o and keyformer.

    Keyformer's prompt queries all have step 0, hence temperature tau_init
    whatever max_tokens is, so one pass serves every budget.
    """
    layers = model.attention_layers()
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    h2o: list[torch.Tensor] = []
    keyformer: list[torch.Tensor] = []
    seed_t = torch.tensor(seed, dtype=torch.int64)

    def attend(i: int, attn: PagedAttention, q, k, v, positions) -> torch.Tensor:
        keys.append(k.clone())
        values.append(v.clone())
        plain, noisy = _prompt_scores(attn, i, q, k, seed_t, tau_init)
        h2o.append(plain)
        keyformer.append(noisy)
        return _causal_attention(attn, q, k, v)

    with _patched(layers, attend):
        logits = _forward(model, list(prompt), torch.arange(len(prompt)), last_only=True)
    return Prefill(
        prompt=list(prompt),
        seed=seed,
        keys=keys,
        values=values,
        scores={"h2o": torch.stack(h2o), "keyformer": torch.stack(keyformer)},
        first_token=int(logits[-1].argmax()),
    )


def _causal_attention(
    attn: PagedAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """Plain causal attention over the whole prompt, as the engine runs a fresh
    prompt: q [n, Hq, D], k, v [n, Hkv, D] -> [n, Hq * D]."""
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),
        k.transpose(0, 1).unsqueeze(0),
        v.transpose(0, 1).unsqueeze(0),
        is_causal=True,
        scale=attn.scale,
        enable_gqa=attn.num_heads != attn.num_kv_heads,
    )
    return out.squeeze(0).transpose(0, 1).flatten(1)


def _prompt_scores(
    attn: PagedAttention,
    layer: int,
    q: torch.Tensor,
    k: torch.Tensor,
    seed: torch.Tensor,
    tau_init: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulated prompt scores [Hkv, n] for h2o and keyformer, chunk by chunk
    as engine/attention/layer.py's _score_prefill computes them. A chunk's queries
    see only keys up to its last position, so later keys (all masked, adding
    exactly 0) are left out, which halves the cost of the noise."""
    H, G, n = attn.num_kv_heads, attn.group, k.shape[0]
    keys = k.float().permute(1, 2, 0)  # [Hkv, D, n]
    head = torch.arange(H * G).view(H, G, 1, 1)
    h2o = torch.zeros(H, n)
    kf = torch.zeros(H, n)
    for start in range(0, n, SCORE_QUERY_CHUNK):
        qc = q[start : start + SCORE_QUERY_CHUNK].float()
        c = qc.shape[0]
        width = start + c
        qs = qc.view(c, H, G, -1).permute(1, 2, 0, 3)  # [Hkv, G, c, D]
        logits = torch.matmul(qs, keys[:, :, :width].unsqueeze(1)) * attn.scale
        q_pos = torch.arange(start, width).view(1, 1, c, 1)
        k_pos = torch.arange(width).view(1, 1, 1, width)
        logits = logits.masked_fill(k_pos > q_pos, float("-inf"))
        h2o[:, :width] += step_scores(logits, None, None).sum(dim=(1, 2))
        noise = finite_gumbel_noise(seed, layer, head, q_pos, k_pos)
        tau = None if tau_init == 1.0 else torch.tensor(tau_init)
        kf[:, :width] += step_scores(logits, tau, noise).sum(dim=(1, 2))
    return h2o, kf


# -- the decode runs -----------------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    """One greedy generation of the prompt under one policy and budget."""

    settings: KVPolicySettings
    # kv_ratio values at which to also record the oracle mass: what the best
    # kept set of that size could hold at each step (meant for full runs).
    oracle_ratios: tuple[float, ...] = ()


@dataclass
class RunResult:
    tokens: list[int]
    budget: int | None
    # [decode steps, L, Hq]: full-attention mass on the kept tokens (None for full)
    mass: torch.Tensor | None
    # kv_ratio -> [decode steps, L, Hkv]: the oracle mass
    oracle: dict[float, torch.Tensor]


class BatchDecode:
    """All runs of one prompt, decoded greedily together: row r follows specs[r]."""

    @torch.inference_mode()
    def __init__(
        self,
        model: torch.nn.Module,
        prefill: Prefill,
        specs: Sequence[RunSpec],
        max_tokens: int,
    ) -> None:
        self.model = model
        self.layers = model.attention_layers()
        self.prefill = prefill
        self.specs = list(specs)
        self.max_tokens = max_tokens
        self.n = n = len(prefill.prompt)
        if any(s.settings.chooses_budget for s in self.specs):
            # Its budget is known only at the prompt's end: bench.accuracy measures it.
            raise ValueError("kv_target_mass is not modelled by the dense measurement model")
        self.budgets = [s.settings.budget(n) for s in self.specs]
        R, L = len(self.specs), len(self.layers)
        Hkv, D = prefill.keys[0].shape[1:]
        self.gen_keys = [prefill.keys[0].new_zeros(R, max_tokens, Hkv, D) for _ in range(L)]
        self.gen_values = [prefill.keys[0].new_zeros(R, max_tokens, Hkv, D) for _ in range(L)]
        self.kept = torch.zeros(R, L, Hkv, n + max_tokens, dtype=torch.bool)
        self.kept[..., :n] = True
        self.scores = torch.zeros(R, L, Hkv, n + max_tokens)
        for r, spec in enumerate(self.specs):
            if spec.settings.kv_policy in SCORED_POLICIES:
                self.scores[r, ..., :n] = prefill.scores[spec.settings.kv_policy]
        self.scored_rows = self._rows(lambda s: s.kv_policy in SCORED_POLICIES)
        self.gumbel = torch.tensor([s.settings.kv_policy == "keyformer" for s in self.specs])
        taus = [_tau(s.settings, max_tokens) for s in self.specs]
        self.tau_init = torch.tensor([init for init, _ in taus])
        self.tau_slope = torch.tensor([slope for _, slope in taus])
        self.seed = torch.tensor(prefill.seed, dtype=torch.int64)
        self.mass: list[torch.Tensor] = []  # per step [R, L, Hq]
        self.oracle: list[dict[float, torch.Tensor]] = []  # per step: ratio -> [L, Hkv]
        self._step_mass: list[torch.Tensor] = []
        self._step_oracle: dict[tuple[int, float], list[torch.Tensor]] = {}

    def _rows(self, pick: Callable[[KVPolicySettings], bool]) -> torch.Tensor:
        return torch.tensor([r for r, s in enumerate(self.specs) if pick(s.settings)])

    @torch.inference_mode()
    def run(self, progress: Callable[[int], None] | None = None) -> list[RunResult]:
        tokens = [[self.prefill.first_token] for _ in self.specs]
        self._evict(self.n)
        with _patched(self.layers, self._attend):
            for step in range(self.max_tokens - 1):
                pos = self.n + step
                tokens = self._decode(tokens, pos)
                self._evict(pos + 1)
                if progress is not None:
                    progress(step + 1)
        return [self._result(r, t) for r, t in enumerate(tokens)]

    def _result(self, r: int, tokens: list[int]) -> RunResult:
        mass = torch.stack([m[r] for m in self.mass]) if self.budgets[r] is not None else None
        oracle = {
            ratio: torch.stack([step[(r, ratio)] for step in self.oracle])
            for ratio in self.specs[r].oracle_ratios
        }
        return RunResult(tokens=tokens, budget=self.budgets[r], mass=mass, oracle=oracle)

    def _decode(self, tokens: list[list[int]], pos: int) -> list[list[int]]:
        self.kept[..., pos] = True
        self._step_mass = []
        self._step_oracle = {}
        ids = [t[-1] for t in tokens]
        logits = _forward(self.model, ids, torch.full((len(ids),), pos))
        self.mass.append(torch.stack(self._step_mass, dim=1))  # [R, L, Hq]
        self.oracle.append({k: torch.stack(v) for k, v in self._step_oracle.items()})
        return [t + [int(x)] for t, x in zip(tokens, logits.argmax(-1), strict=True)]

    # -- attention ---------------------------------------------------------

    def _attend(self, i: int, attn: PagedAttention, q, k, v, positions) -> torch.Tensor:
        """One decode token per row through layer i: q [R, Hq, D], k, v [R, Hkv, D]."""
        pos = int(positions[0])
        t = pos - self.n
        self.gen_keys[i][:, t] = k
        self.gen_values[i][:, t] = v
        R, H, G = q.shape[0], attn.num_kv_heads, attn.group
        qs = q.float().view(R, H, G, -1)
        logits = (
            torch.cat(
                [
                    torch.einsum("rhgd,nhd->rhgn", qs, self.prefill.keys[i].float()),
                    torch.einsum("rhgd,rthd->rhgt", qs, self.gen_keys[i][:, : t + 1].float()),
                ],
                dim=-1,
            )
            * attn.scale
        )  # [R, Hkv, G, N]
        kept = self.kept[:, i, :, : pos + 1].unsqueeze(2)  # [R, Hkv, 1, N]
        self._measure(logits, kept)
        masked = logits.masked_fill(~kept, float("-inf"))
        if self.scored_rows.numel():
            self._score(i, masked, pos)
        probs = torch.softmax(masked, dim=-1)
        out = torch.einsum("rhgn,nhd->rhgd", probs[..., : self.n], self.prefill.values[i].float())
        out = out + torch.einsum(
            "rhgt,rthd->rhgd", probs[..., self.n :], self.gen_values[i][:, : t + 1].float()
        )
        return out.reshape(R, -1).to(q.dtype)

    def _measure(self, logits: torch.Tensor, kept: torch.Tensor) -> None:
        full = torch.softmax(logits, dim=-1)  # [R, Hkv, G, N]
        self._step_mass.append((full * kept).sum(-1).flatten(1))  # [R, Hq]
        for r, spec in enumerate(self.specs):
            if not spec.oracle_ratios:
                continue
            per_kv = full[r].sum(1)  # [Hkv, N]: one kept set serves the kv-head's group
            for ratio in spec.oracle_ratios:
                size = min(oracle_size(spec.settings, self.n, ratio), per_kv.shape[-1])
                best = per_kv.topk(size, dim=-1).values.sum(-1) / full.shape[2]
                self._step_oracle.setdefault((r, ratio), []).append(best)

    def _score(self, i: int, masked: torch.Tensor, pos: int) -> None:
        """Add this step's h2o / keyformer contribution as engine/attention/layer.py's
        _score_decode does: noise times the row's gumbel flag, float32 tau."""
        rows = self.scored_rows
        H, G, N = masked.shape[1:]
        head = torch.arange(H * G).view(1, H, G, 1)
        q_pos = torch.tensor(pos)
        noise = finite_gumbel_noise(self.seed, i, head, q_pos, torch.arange(N).view(1, 1, 1, N))
        noise = noise * self.gumbel[rows].view(-1, 1, 1, 1)
        step = (q_pos - self.n + 1).clamp(min=0)
        tau = self.tau_init[rows].view(-1, 1, 1, 1) + step * self.tau_slope[rows].view(-1, 1, 1, 1)
        contrib = step_scores(masked[rows], tau, noise).sum(2)  # [b, Hkv, N]
        self.scores[rows, i, :, :N] += contrib

    # -- eviction ----------------------------------------------------------

    def _evict(self, length: int) -> None:
        for r in range(len(self.specs)):
            if self.budgets[r] is not None:
                self._evict_row(r, length)

    def _evict_row(self, r: int, length: int) -> None:
        """Cut every (layer, kv-head) of row r back to its budget; `length` is
        the sequence's logical length (the position of its next token)."""
        kept = self.kept[r]
        count = int(kept[0, 0, :length].sum())
        excess = count - self.budgets[r]
        if excess <= 0:
            return
        L, H = kept.shape[:2]
        held = kept[:, :, :length].nonzero()[:, 2].view(L, H, count)  # ascending positions
        priority = self._priority(r, held, length)
        # A stable sort over ascending positions: equal priorities evict the older.
        order = priority.argsort(dim=-1, stable=True)[..., :excess]
        kept.scatter_(-1, held.gather(-1, order), False)

    def _priority(self, r: int, held: torch.Tensor, length: int) -> torch.Tensor:
        """Keep-priority of each held token [L, Hkv, count]: higher stays."""
        s = self.specs[r].settings
        inf = float("inf")
        if s.kv_policy == "window":
            return held.float()
        if s.kv_policy == "streaming":
            return held.float().masked_fill(held < s.sink_tokens, inf)
        recent = held >= length - s.recent_window(self.budgets[r])
        return self.scores[r].gather(-1, held).masked_fill(recent, inf)


def oracle_size(settings: KVPolicySettings, prompt_len: int, ratio: float) -> int:
    """Tokens a policy at `ratio` reads at a decode step: its budget plus the new token."""
    rule = KVPolicySettings(
        kv_policy="window",
        kv_ratio=ratio,
        kv_min_tokens=settings.kv_min_tokens,
        kv_max_tokens=settings.kv_max_tokens,
    )
    return rule.budget(prompt_len) + 1


def _tau(s: KVPolicySettings, max_tokens: int) -> tuple[float, float]:
    """(tau_init, slope) of the row's temperature; h2o and the others: (1, 0)."""
    if s.kv_policy != "keyformer":
        return 1.0, 0.0
    return s.tau_init, (s.tau_end - s.tau_init) / max(max_tokens, 1)


# -- plumbing ------------------------------------------------------------------

Attend = Callable[..., torch.Tensor]


@contextmanager
def _patched(layers: list[PagedAttention], attend: Attend) -> Iterator[None]:
    """Route every attention layer's forward(q, k, v, ctx) to attend(i, attn, ...);
    the model is called with the token positions where the context would go."""
    for attn in layers:
        if attn.alibi_slopes is not None or attn.sliding_window is not None:
            raise ValueError("the dense measurement model supports RoPE-only models")
    originals = [a.forward for a in layers]
    try:
        for i, attn in enumerate(layers):
            attn.forward = _bind(attend, i, attn)
        yield
    finally:
        for attn, fwd in zip(layers, originals, strict=True):
            attn.forward = fwd


def _bind(attend: Attend, i: int, attn: PagedAttention) -> Callable[..., torch.Tensor]:
    def forward(q, k, v, positions):
        return attend(i, attn, q, k, v, positions)

    return forward


def _forward(
    model: torch.nn.Module, tokens: list[int], positions: torch.Tensor, last_only: bool = False
) -> torch.Tensor:
    """Logits [T, vocab] of the T flat tokens at `positions` (the last one only
    with last_only)."""
    hidden = model(torch.tensor(tokens), positions, positions)
    return model.compute_logits(hidden[-1:] if last_only else hidden)
