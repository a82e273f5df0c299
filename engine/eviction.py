"""After each step, cut every evicting sequence back to its budget and free
the blocks that became empty, before the scheduler builds the next batch."""

from dataclasses import dataclass

from engine.context import ScoreSpec
from engine.kv_cache import PagedKVCache
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
    def __init__(self, cache: PagedKVCache, kv: KVCacheManager) -> None:
        self.cache = cache
        self.kv = kv
        self.stats = EvictionStats()

    def maybe_evict(self, request: Request, seq: SequencePolicy) -> int:
        """Cut the request to its budget if it is over; returns blocks freed."""
        if seq.budget is None or request.is_finished:
            return 0
        # The first prompt pass scores every prompt query before choosing; a
        # recompute after preemption evicts chunk by chunk to stay small.
        prompt_done = request.num_computed_tokens >= request.num_prompt_tokens
        if not prompt_done and request.num_preemptions == 0:
            return 0
        rid = request.request_id
        num_slots = self.kv.num_slots(rid)
        if num_slots <= seq.budget:
            return 0
        blocks = self.kv.block_table(rid)
        scores, positions = self.cache.read_slot_state(blocks, num_slots)
        victims = seq.policy.select_victims(
            scores if seq.policy.needs_scores else None,
            positions,
            seq.budget,
            request.num_computed_tokens,
        )
        self.cache.compact(blocks, victims, num_slots)
        freed = self.kv.shrink(rid, seq.budget)
        self.stats.tokens_evicted += num_slots - seq.budget
        self.stats.blocks_freed += freed
        self.stats.evictions += 1
        return freed
