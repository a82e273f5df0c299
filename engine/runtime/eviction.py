"""After each step, cut every evicting sequence back to its budget and free
the blocks that became empty, before the scheduler builds the next batch."""

from dataclasses import dataclass

import torch

from engine.attention.context import ScoreSpec
from engine.kernels.cpu import lowest_priority_slots
from engine.runtime.kv_cache import PagedKVCache
from kv_manager import KVCacheManager
from kv_manager.policies import EvictionPolicy, HeavyHitterPolicy, KVPolicySettings
from scheduler import Request


@dataclass
class SequencePolicy:
    """A request's eviction policy with its resolved budget."""

    settings: KVPolicySettings
    policy: EvictionPolicy
    budget: int | None  # slots kept; None: never evicts
    seed: int  # the request's seed, also Keyformer's noise key

    def score_spec(self, request: Request) -> ScoreSpec | None:
        """How attention scores this request's slots (None: no scores needed)."""
        if not isinstance(self.policy, HeavyHitterPolicy):
            return None
        s = self.settings
        if self.policy.uses_gumbel:
            slope = (s.tau_end - s.tau_init) / max(request.max_tokens, 1)
            return ScoreSpec(self.seed, True, request.num_prompt_tokens, s.tau_init, slope)
        return ScoreSpec(self.seed, False, request.num_prompt_tokens, 1.0, 0.0)


@dataclass
class EvictionStats:
    tokens_evicted: int = 0  # slots dropped (per sequence, counted once per slot index)
    blocks_freed: int = 0  # blocks returned to the pool by eviction
    evictions: int = 0  # sequences cut back


class Evictor:
    """Cuts sequences back to their budgets and frees the emptied blocks."""

    def __init__(self, cache: PagedKVCache, kv: KVCacheManager) -> None:
        self.cache = cache
        self.kv = kv
        self.stats = EvictionStats()

    def evict(self, items: list[tuple[Request, SequencePolicy]]) -> None:
        """Cut every request that is over its budget.

        Sequences one slot over (a decode step at the budget: the common case)
        are cut together in a few batched ops; the rest one by one.
        """
        one_over, others = [], []
        for request, seq in items:
            excess = self._excess(request, seq)
            if excess == 1:
                one_over.append((request, seq))
            elif excess > 1:
                others.append((request, seq))
        if one_over:
            self._drop_one_each(one_over)
        for request, seq in others:
            self._evict_one(request, seq)

    def _excess(self, request: Request, seq: SequencePolicy) -> int:
        if seq.budget is None or request.is_finished:
            return 0
        # The first prompt pass scores every prompt query before choosing; a
        # recompute after preemption evicts chunk by chunk to stay small.
        prompt_done = request.num_computed_tokens >= request.num_prompt_tokens
        if not prompt_done and request.num_preemptions == 0:
            return 0
        return max(0, self.kv.num_slots(request.request_id) - seq.budget)

    def _evict_one(self, request: Request, seq: SequencePolicy) -> None:
        rid = request.request_id
        num_slots = self.kv.num_slots(rid)
        blocks = self.kv.block_table(rid)
        scores, positions = self.cache.read_slot_state(blocks, num_slots)
        victims = seq.policy.select_victims(
            scores if seq.policy.needs_scores else None,
            positions,
            seq.budget,
            request.num_computed_tokens,
        )
        self.cache.compact(blocks, victims, num_slots)
        self._shrink(rid, num_slots, seq.budget)

    def _drop_one_each(self, items: list[tuple[Request, SequencePolicy]]) -> None:
        """One victim per (sequence, layer, head): the lowest keep-priority,
        the oldest among equals (the rule `select_victims` applies)."""
        ids = [r.request_id for r, _ in items]
        counts = [self.kv.num_slots(i) for i in ids]
        slots = self.cache.padded_slots([self.kv.block_table(i) for i in ids], counts)
        count = torch.tensor(counts, device=slots.device)
        victims = self._lowest_in_place(items, slots, count)
        if victims is None:
            victims = self._lowest_by_priority(items, slots, count)
        self.cache.drop_one_each(slots, victims, count - 1)
        for (r, seq), n in zip(items, counts, strict=True):
            self._shrink(r.request_id, n, seq.budget)

    def _lowest_in_place(
        self, items: list[tuple[Request, SequencePolicy]], slots: torch.Tensor, count: torch.Tensor
    ) -> torch.Tensor | None:
        """Victims [B, L, H] from the C++ selection, which reads the cache in
        place: on the CPU, for a batch of score-based policies (None otherwise)."""
        kernel = lowest_priority_slots() if slots.device.type == "cpu" else None
        if kernel is None or not all(isinstance(s.policy, HeavyHitterPolicy) for _, s in items):
            return None
        starts = [s.policy.recent_start(s.budget, r.num_computed_tokens) for r, s in items]
        L, _, _, H = self.cache.scores.shape
        scores, positions = self.cache.scores.view(L, -1, H), self.cache.positions.view(L, -1, H)
        return kernel(scores, positions, slots, count, torch.tensor(starts))

    def _lowest_by_priority(
        self, items: list[tuple[Request, SequencePolicy]], slots: torch.Tensor, count: torch.Tensor
    ) -> torch.Tensor:
        """Victims [B, L, H] from each policy's keep-priorities, in torch."""
        scores, positions = self.cache.read_slot_state_batch(slots)  # [B, L, H, S]
        priority = torch.stack(
            [
                seq.policy.keep_priority(scores[i], positions[i], seq.budget, r.num_computed_tokens)
                for i, (r, seq) in enumerate(items)
            ]
        )
        valid = torch.arange(slots.shape[1], device=slots.device) < count.view(-1, 1)
        valid = valid.view(len(items), 1, 1, -1)
        priority = priority.masked_fill(~valid, float("inf"))
        lowest = priority == priority.amin(dim=-1, keepdim=True)
        never = torch.iinfo(positions.dtype).max
        return positions.masked_fill(~(lowest & valid), never).argmin(dim=-1)

    def _shrink(self, request_id: str, num_slots: int, budget: int) -> None:
        freed = self.kv.shrink(request_id, budget)
        self.stats.tokens_evicted += num_slots - budget
        self.stats.blocks_freed += freed
        self.stats.evictions += 1
