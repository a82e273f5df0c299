"""After each step, choose what every evicting sequence keeps and move it into
the sequence's first slots; the scheduler then frees the blocks past them
(`Scheduler.apply_evictions`), before it builds the next batch. Under memory
pressure the scheduler also asks it to squeeze a sequence below its budget
(scheduler/pressure.py: it is the scheduler's `Squeezer`).

Prompts are compressed while they prefill: an evicting sequence is cut back
to its budget at every `prefill_chunk`-th prompt token (the scheduler ends its
prompt chunks there: Request.cut_point) and at the prompt's end, its keys
scored by the prompt queries seen so far. It never holds more than its budget
plus one chunk, so a prompt larger than the whole pool can run; a chunk of
the whole prompt is the "cut after the whole prefill" of before."""

import torch

from engine.kernels.cpu import lowest_priority_slots
from engine.runtime.kv_cache import PagedKVCache
from kv_manager import KVCacheManager
from kv_manager.policies import HeavyHitterPolicy, SequencePolicy
from scheduler import Request, SlotCut


class Evictor:
    """Compacts sequences over their budgets in the cache tensors and reports
    the cuts. It reads block tables; it never allocates or frees."""

    def __init__(self, cache: PagedKVCache, kv: KVCacheManager, prefill_chunk: int) -> None:
        self.cache = cache
        self.kv = kv
        self.prefill_chunk = prefill_chunk

    def evict(self, requests: list[Request]) -> list[SlotCut]:
        """Compact every request that is over its budget; returns the cuts.

        Sequences one slot over (a decode step at the budget: the common case)
        are cut together in a few batched ops; the rest one by one.
        """
        one_over, others = [], []
        for request in requests:
            excess = self._excess(request)
            # A prompt cut of a policy with its own cut scores (snapkv's
            # pooling) takes the general path, whatever its excess.
            if excess == 1 and not _ranks_prompt_cut(request):
                one_over.append(request)
            elif excess > 1:
                others.append(request)
        cuts = []
        if one_over:
            self._drop_one_each(one_over)
            cuts += [SlotCut(r.request_id, r.slot_budget) for r in one_over]
        for request in others:
            cuts.append(self.cut(request, request.slot_budget))
        return cuts

    def cut(self, request: Request, budget: int) -> SlotCut:
        """Cut one sequence to `budget` slots now, its policy choosing the
        victims at its current length."""
        rid = request.request_id
        scores, positions = self._slot_state(request)
        victims = self._victims(request, budget, scores, positions)
        self.cache.compact(self.kv.block_table(rid), victims, self.kv.num_slots(rid))
        return SlotCut(rid, budget)

    def lost_score(self, request: Request, budget: int) -> float:
        """The share of the sequence's cached score that cutting it to `budget`
        now would evict; for the position-only policies, the share of its keys.
        NOTE: one host sync per call; it runs only when the pool is full."""
        if not request.kv.scores_keys:
            num_slots = self.kv.num_slots(request.request_id)
            return (num_slots - budget) / num_slots
        scores, positions = self._slot_state(request)
        total = float(scores.sum())
        if total <= 0:
            return 0.0
        victims = self._victims(request, budget, scores, positions)
        return float(scores.gather(-1, victims).sum()) / total

    def _excess(self, request: Request) -> int:
        budget = request.slot_budget
        if budget is None or request.is_finished:
            return 0
        # Mid-prompt, only at the fixed cut points: a chunk the token budget
        # ended early is cut where the next one ends, so the cuts do not
        # depend on what else ran in the batch.
        n = request.num_computed_tokens
        if n < request.num_prompt_tokens and n % self.prefill_chunk:
            return 0
        return max(0, self.kv.num_slots(request.request_id) - budget)

    def _slot_state(self, request: Request) -> tuple[torch.Tensor, torch.Tensor]:
        """The sequence's scores and positions, each [L, Hkv, slots]."""
        rid = request.request_id
        return self.cache.read_slot_state(self.kv.block_table(rid), self.kv.num_slots(rid))

    @staticmethod
    def _victims(
        request: Request, budget: int, scores: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """The slots [L, Hkv, slots - budget] the policy drops to keep `budget`."""
        seq: SequencePolicy = request.kv
        n = request.num_computed_tokens
        if not seq.scores_keys:
            scores = None
        elif _ranks_prompt_cut(request):
            scores = seq.policy.cut_scores(scores, positions, budget, n)
        return seq.policy.select_victims(scores, positions, budget, n)

    def _drop_one_each(self, requests: list[Request]) -> None:
        """One victim per (sequence, layer, head): the lowest keep-priority,
        the oldest among equals (the rule `select_victims` applies)."""
        ids = [r.request_id for r in requests]
        counts = [self.kv.num_slots(i) for i in ids]
        slots = self.cache.padded_slots([self.kv.block_table(i) for i in ids], counts)
        count = torch.tensor(counts, device=slots.device)
        victims = self._lowest_in_place(requests, slots, count)
        if victims is None:
            victims = self._lowest_by_priority(requests, slots, count)
        self.cache.drop_one_each(slots, victims, count - 1)

    def _lowest_in_place(
        self, requests: list[Request], slots: torch.Tensor, count: torch.Tensor
    ) -> torch.Tensor | None:
        """Victims [B, L, H] from the C++ selection, which reads the cache in
        place: on the CPU, for a batch of score-based policies (None otherwise)."""
        kernel = lowest_priority_slots() if slots.device.type == "cpu" else None
        starts = _recent_starts(requests)
        if kernel is None or starts is None:
            return None
        L, _, _, H = self.cache.scores.shape
        scores, positions = self.cache.scores.view(L, -1, H), self.cache.positions.view(L, -1, H)
        return kernel(
            scores=scores, positions=positions, slots=slots, counts=count,
            recent_start=torch.tensor(starts),
        )  # fmt: skip

    def _lowest_by_priority(
        self, requests: list[Request], slots: torch.Tensor, count: torch.Tensor
    ) -> torch.Tensor:
        """Victims [B, L, H] from each policy's keep-priorities, in torch."""
        scores, positions = self.cache.read_slot_state_batch(slots)  # [B, L, H, S]
        priority = self._heavy_hitter_priorities(requests, scores, positions)
        if priority is None:
            priority = torch.stack(
                [
                    r.kv.policy.keep_priority(
                        scores[i], positions[i], r.slot_budget, r.num_computed_tokens
                    )
                    for i, r in enumerate(requests)
                ]
            )
        valid = torch.arange(slots.shape[1], device=slots.device) < count.view(-1, 1)
        valid = valid.view(len(requests), 1, 1, -1)
        priority = priority.masked_fill(~valid, float("inf"))
        lowest = priority == priority.amin(dim=-1, keepdim=True)
        never = torch.iinfo(positions.dtype).max
        return positions.masked_fill(~(lowest & valid), never).argmin(dim=-1)

    @staticmethod
    def _heavy_hitter_priorities(
        requests: list[Request], scores: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor | None:
        """HeavyHitterPolicy.keep_priority for a whole batch of h2o/keyformer
        sequences in one pass (None for any other mix): the score, +inf from
        each row's recent window on. One launch, not a few per sequence."""
        starts = _recent_starts(requests)
        if starts is None:
            return None
        recent = positions >= torch.tensor(starts, device=positions.device).view(-1, 1, 1, 1)
        return scores.float().masked_fill(recent, float("inf"))


def _ranks_prompt_cut(request: Request) -> bool:
    """Whether the request's next cut is a prompt cut that ranks by the
    policy's own cut scores (snapkv pools them) rather than the plain ones."""
    policy = request.kv.policy
    return (
        isinstance(policy, HeavyHitterPolicy)
        and policy.pools_prompt
        and request.num_computed_tokens <= request.num_prompt_tokens
    )


def _recent_starts(requests: list[Request]) -> list[int] | None:
    """Each sequence's first recent-window position, when every one is an
    h2o/keyformer sequence (their keep-priority is the score below it and
    +inf from it on); None for any other mix."""
    if not all(isinstance(r.kv.policy, HeavyHitterPolicy) for r in requests):
        return None
    return [r.kv.policy.recent_start(r.slot_budget, r.num_computed_tokens) for r in requests]
