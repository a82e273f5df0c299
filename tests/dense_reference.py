"""A plain, unpaged reference of every KV policy, straight from keyformer.md.

It runs one request at a time through the same model weights, but replaces the
paged attention with a dense one: per layer, K/V for every token ever seen in
one tensor, and an explicit `alive` mask per (kv-head, token) that eviction
clears. Nothing is moved, compacted or paged; scores and victims are computed
with plain loops. The engine must produce exactly this reference's tokens.

In bfloat16 (the engine's model in bfloat16: q, k, v come out of it rounded,
the attention math here stays float32, its output is rounded back, and the
scores accumulate in Python floats) the tokens and scores agree with the
engine's only up to rounding, so the reference can instead follow the
engine's tokens (`generate(..., follow=...)`) and hand each cut to `on_cut`,
which may compare it with the engine's and `adopt` the engine's choice.
"""

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from engine import LLM
from engine.attention.layer import PagedAttention
from engine.runtime.sampler import SamplingRow, sample
from engine.runtime.sampling_params import SamplingParams
from kv_manager.policies import KVPolicySettings
from kv_manager.scoring import gumbel_noise


@dataclass
class DenseLayer:
    k: list[torch.Tensor] = field(default_factory=list)  # per token [Hkv, D]
    v: list[torch.Tensor] = field(default_factory=list)
    alive: list[list[bool]] = field(default_factory=list)  # [token][kv-head]
    score: list[list[float]] = field(default_factory=list)  # [token][kv-head]


class DenseReference:
    """Greedy or seeded generation of one request with a dense, masked cache."""

    def __init__(self, model: torch.nn.Module, settings: KVPolicySettings) -> None:
        self.model = model
        self.settings = settings
        self.layers = model.attention_layers()
        # Called with the sequence's length after every cut (the reference's own
        # choice made); it may adopt() another choice before decoding goes on.
        self.on_cut: Callable[[int], None] | None = None

    def generate(
        self,
        prompt: list[int],
        params: SamplingParams,
        budgets: Mapping[int, int] | None = None,
        follow: Sequence[int] | None = None,
        chunk: int | None = None,
    ) -> list[int]:
        """The request's output tokens. `budgets` is a budget schedule,
        {logical length: budget}: once the sequence reaches that length (after
        that step's own cut) it is cut to the new budget and keeps it from
        then on, as a squeeze under memory pressure does (a Request's
        `squeezes` are such pairs). With `follow`, those tokens are fed back
        in place of the sampled ones (and returned). With `chunk`, the prompt
        is compressed while it prefills, as the engine does with
        max_num_batched_tokens = chunk: it runs in chunks of that many tokens
        and is cut to the budget after each (None: one chunk)."""
        schedule = dict(budgets or {})
        n = len(prompt)
        self.state = [DenseLayer() for _ in self.layers]
        self.prompt_len, self.max_tokens = n, params.max_tokens
        self.budget = self.settings.budget(n)
        self.chunk = chunk or n
        # snapkv's pooled scores at the last prompt cut, by (id(layer state), kv-head).
        self.pooled: dict[tuple[int, int], dict[int, float]] = {}
        seed = params.seed
        # The sampler's generator lives where the model does, as in the engine.
        self.device = next(self.model.parameters()).device
        gen = torch.Generator(device=self.device).manual_seed(seed)
        self.seed = seed
        originals = [a.forward for a in self.layers]
        try:
            for i, attn in enumerate(self.layers):
                attn.forward = self._dense_forward(attn, i)
            out: list[int] = []
            pos = self._prefill_head(prompt, chunk or n)
            tokens = list(prompt[pos:])
            while len(out) < params.max_tokens:
                logits = self._forward(tokens, pos)
                self._choose_budget(pos + len(tokens))
                self._evict(pos + len(tokens))
                pos += len(tokens)
                if pos in schedule:
                    self.budget = schedule[pos]
                    self._evict(pos)
                row = SamplingRow(params, gen, prompt, out, frozenset())
                token = sample(logits, [row])[0].token_id if follow is None else follow[len(out)]
                out.append(token)
                tokens = [token]
            return out
        finally:
            for attn, fwd in zip(self.layers, originals, strict=True):
                attn.forward = fwd

    def _prefill_head(self, prompt: list[int], chunk: int) -> int:
        """Every whole chunk of the prompt but the last, each cut after; returns
        where the rest starts."""
        pos = 0
        while len(prompt) - pos > chunk:
            self._forward(prompt[pos : pos + chunk], pos)
            pos += chunk
            self._evict(pos)
        return pos

    @torch.inference_mode()
    def _forward(self, tokens: list[int], start: int) -> torch.Tensor:
        ids = torch.tensor(tokens, device=self.device)
        positions = torch.arange(start, start + len(tokens), device=self.device)
        hidden = self.model(ids, positions, positions)  # ctx slot carries the positions
        return self.model.compute_logits(hidden[-1:])

    # -- attention -------------------------------------------------------------

    def _dense_forward(self, attn: PagedAttention, layer: int):
        def forward(q, k, v, positions):
            st, dtype = self.state[layer], q.dtype
            # The dense math runs on the CPU in float32, whatever the model's device.
            q, k, v = q.float().cpu(), k.float().cpu(), v.float().cpu()
            for t in range(k.shape[0]):
                st.k.append(k[t])
                st.v.append(v[t])
                st.alive.append([True] * attn.num_kv_heads)
                st.score.append([0.0] * attn.num_kv_heads)
            outs = [
                self._attend_query(attn, layer, q[i], int(positions[i])) for i in range(q.shape[0])
            ]
            return torch.stack(outs).to(self.device, dtype).flatten(1)

        return forward

    def _attend_query(self, attn: PagedAttention, layer: int, q: torch.Tensor, qpos: int):
        st = self.state[layer]
        keys = torch.stack(st.k[: qpos + 1])  # [N, Hkv, D], position = index
        values = torch.stack(st.v[: qpos + 1])
        group = attn.num_heads // attn.num_kv_heads
        out = []
        for h in range(attn.num_heads):
            kvh = h // group
            logits = (keys[:, kvh] @ q[h].float()) * attn.scale  # [N]
            kpos = torch.arange(qpos + 1)
            if attn.alibi_slopes is not None:
                logits = logits + attn.alibi_slopes[h].cpu() * (kpos - qpos)
            visible = torch.tensor([st.alive[j][kvh] for j in range(qpos + 1)])
            if attn.sliding_window is not None:
                visible &= kpos > qpos - attn.sliding_window
            logits = logits.masked_fill(~visible, float("-inf"))
            out.append(torch.softmax(logits, -1) @ values[:, kvh])
            self._accumulate(layer, h, kvh, logits, qpos)
        return torch.stack(out)

    def _accumulate(self, layer: int, head: int, kvh: int, logits: torch.Tensor, qpos: int):
        s = self.settings
        if s.kv_policy not in ("h2o", "keyformer", "snapkv") or not self._scores(qpos):
            return
        x = logits
        if s.kv_policy == "keyformer":
            kpos = torch.arange(logits.shape[0])
            g = gumbel_noise(
                torch.tensor(self.seed), layer, torch.tensor(head), torch.tensor(qpos), kpos
            )
            step = max(0, qpos - self.prompt_len + 1)
            tau = s.tau_init + step * (s.tau_end - s.tau_init) / max(self.max_tokens, 1)
            x = (logits + g) / tau
        f = torch.softmax(x, -1)
        st = self.state[layer]
        for j in range(logits.shape[0]):
            st.score[j][kvh] += float(f[j])

    def _scores(self, qpos: int) -> bool:
        """Whether the query at qpos adds to the scores: a generated token's
        unless decode_scoring is frozen; a prompt token's if it is among the
        last score_window before the prompt cut that ends its stretch (the
        first multiple of the chunk past it at which the sequence is over its
        budget, else the prompt's end)."""
        s, n = self.settings, self.prompt_len
        if qpos >= n:
            return s.decode_scoring != "frozen"
        window = s.score_window
        if window is None and s.kv_policy == "snapkv":
            window = 32  # SnapKV's own default
        if window is None:
            return True
        end = n
        if self.budget is not None and n > self.budget:
            m = (qpos // self.chunk + 1) * self.chunk
            while m < n and m <= self.budget:
                m += self.chunk
            end = min(m, n)
        return qpos >= end - window

    # -- eviction --------------------------------------------------------------

    def _evict(self, length: int) -> None:
        """Cut each (layer, kv-head) to the budget (mid-prompt too, chunked)."""
        if self.budget is None:
            return
        # What each (layer, kv-head) held before this cut: the candidates.
        self.held = [
            [[j for j in range(length) if st.alive[j][kvh]] for kvh in range(len(st.alive[0]))]
            for st in self.state
        ]
        self.pooled = {}
        for st, heads in zip(self.state, self.held, strict=True):
            for kvh, alive in enumerate(heads):
                self._pool(st, kvh, alive, length)
                excess = len(alive) - self.budget
                if excess <= 0:
                    continue
                order = sorted(alive, key=lambda j: (self._priority(st, j, kvh, length), j))
                for j in order[:excess]:
                    st.alive[j][kvh] = False
        if self.on_cut is not None:
            self.on_cut(length)

    def priorities(self, layer: int, kvh: int, length: int) -> dict[int, float]:
        """At the cut at `length` (from on_cut): the keep-priority of every
        token (layer, kvh) held before it: the accumulated score, +inf in the
        recent window (window and streaming: the rule's own order)."""
        st = self.state[layer]
        return {j: self._priority(st, j, kvh, length) for j in self.held[layer][kvh]}

    def kept(self, layer: int, kvh: int) -> set[int]:
        """The tokens (layer, kvh) holds now (after the last cut: its choice)."""
        st = self.state[layer]
        return {j for j in range(len(st.alive)) if st.alive[j][kvh]}

    def score(self, layer: int, kvh: int, token: int) -> float:
        """The token's accumulated h2o / keyformer score in (layer, kvh)."""
        return self.state[layer].score[token][kvh]

    def adopt(self, layer: int, kvh: int, kept: set[int]) -> None:
        """At the cut (from on_cut): make (layer, kvh) keep exactly `kept`,
        which must be among what it held before the cut."""
        held = set(self.held[layer][kvh])
        if not kept <= held:
            raise ValueError(f"adopt(): {sorted(kept - held)} were not held")
        st = self.state[layer]
        for j in held:
            st.alive[j][kvh] = j in kept

    def _choose_budget(self, length: int) -> None:
        """kv_target_mass: at the prompt's end, the budget is the largest over
        (layer, kv-head) of the fewest keys that keep the target share of the
        held keys' score (mass_keys), floored and capped."""
        s = self.settings
        if length != self.prompt_len or not s.chooses_budget:
            return
        keys = 1
        for st in self.state:
            for kvh in range(len(st.alive[0])):
                held = {j: st.score[j][kvh] for j in range(length) if st.alive[j][kvh]}
                keys = max(keys, mass_keys(held, length, s))
        self.budget = s.clamp_budget(keys)

    def _priority(self, st: DenseLayer, j: int, kvh: int, length: int) -> float:
        s = self.settings
        if s.kv_policy == "window":
            return float(j)
        if s.kv_policy == "streaming":
            return math.inf if j < s.sink_tokens else float(j)
        window = s.recent_window(self.budget)
        if j >= length - window:
            return math.inf
        pooled = self.pooled.get((id(st), kvh))
        return st.score[j][kvh] if pooled is None else pooled[j]

    def _pool(self, st: DenseLayer, kvh: int, alive: list[int], length: int) -> None:
        """snapkv at a prompt cut: each held token's score becomes the max (or
        the mean over the whole window) of the scores of the held tokens
        within snapkv_kernel // 2 places of it in position order, the recent
        window's tokens and the places past either end left out of the max
        and counted as 0 in the mean."""
        s = self.settings
        if s.kv_policy != "snapkv" or s.snapkv_kernel <= 1 or length > self.prompt_len:
            return
        recent_start = length - s.recent_window(self.budget)
        radius = s.snapkv_kernel // 2
        order = sorted(alive)
        pooled = {}
        for i, j in enumerate(order):
            near = [
                st.score[order[t]][kvh]
                for t in range(i - radius, i + radius + 1)
                if 0 <= t < len(order) and order[t] < recent_start
            ]
            if s.snapkv_pooling == "max":
                pooled[j] = max(near) if near else -math.inf
            else:
                pooled[j] = sum(near) / (2 * radius + 1)
        self.pooled[(id(st), kvh)] = pooled


def mass_keys(held: dict[int, float], length: int, settings: KVPolicySettings) -> int:
    """The fewest keys k of one (layer, kv-head) whose cut keeps at least
    kv_target_mass of the score of all `held` keys ({position: score}), by
    trying every k: the cut keeps the held keys in the recent window (the
    newest floor(k * recent_ratio) positions before `length`) and the highest
    scores among the rest up to k keys. Sums in Python floats."""
    total = sum(held.values())
    for k in range(1, len(held) + 1):
        start = length - settings.recent_window(k)
        recent = [score for j, score in held.items() if j >= start]
        rest = sorted((score for j, score in held.items() if j < start), reverse=True)
        kept = sum(recent) + sum(rest[: k - len(recent)])
        if kept >= settings.kv_target_mass * total:
            return k
    return max(len(held), 1)


# -- the engine against the reference, cut by cut ---------------------------


def record_held(llm: LLM, prompt: list[int], params: SamplingParams) -> tuple[list[int], dict]:
    """The engine's tokens, and after every step the scores and positions
    [L, Hkv, slots] of the keys the request holds, by its length (the pool
    whole at the end)."""
    engine, held, tokens = llm.engine, {}, None
    engine.add_request("0", prompt, params)
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                tokens = out.outputs[0].token_ids
        for req in engine.scheduler.running:
            blocks, n = engine.kv.block_table("0"), engine.kv.num_slots("0")
            scores, positions = engine.runner.cache.read_slot_state(blocks, n)
            held[req.num_computed_tokens] = (scores.clone(), positions.clone())
    assert engine.kv.num_used_blocks == 0
    return tokens, held


def compare_cuts(
    llm: LLM, prompt: list[int], params: SamplingParams, chunk: int | None
) -> tuple[list[int], dict]:
    """Run the engine and the dense reference (the request's KV settings,
    prompt chunks of `chunk`); at every cut the reference makes, the engine
    holds the same keys with the same scores, and the tokens are equal.
    Returns the lengths compared and what the engine held (record_held)."""
    tokens, held = record_held(llm, prompt, params)
    fields = {k: getattr(params, k) for k in params.kv_overrides()}
    reference = DenseReference(llm.engine.model, KVPolicySettings(**fields))
    checked = []

    def compare(length: int) -> None:
        if length not in held:
            return  # the last decode step's cut: the request has left
        scores, positions = held[length]
        for layer in range(positions.shape[0]):
            for head in range(positions.shape[1]):
                kept = positions[layer, head].tolist()
                assert set(kept) == reference.kept(layer, head), (length, layer, head)
                expected = [reference.score(layer, head, j) for j in kept]
                torch.testing.assert_close(
                    scores[layer, head].float(), torch.tensor(expected), rtol=1e-4, atol=1e-5
                )
        checked.append(length)

    reference.on_cut = compare
    assert reference.generate(prompt, params, chunk=chunk) == tokens
    return checked, held
