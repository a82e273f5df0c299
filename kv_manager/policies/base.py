"""The one interface every eviction policy implements."""

import torch

from kv_manager.policies.settings import KVPolicySettings


class EvictionPolicy:
    """Picks, per (layer, kv-head), which cached slots to drop.

    A policy ranks slots by a keep-priority; the lowest-ranked slots beyond
    the budget are evicted. Ties break toward evicting the older token, so a
    plain reference can reproduce the choice exactly.
    """

    needs_scores = False

    def __init__(self, settings: KVPolicySettings) -> None:
        self.settings = settings

    def keep_priority(
        self,
        scores: torch.Tensor | None,
        positions: torch.Tensor,
        budget: int,
        logical_len: int,
    ) -> torch.Tensor:
        """Higher keeps. scores, positions: [L, H, S] -> [L, H, S] float."""
        raise NotImplementedError

    def select_victims(
        self,
        scores: torch.Tensor | None,
        positions: torch.Tensor,
        budget: int,
        logical_len: int,
    ) -> torch.Tensor:
        """Slots to evict so that `budget` remain: [L, H, S - budget] slot indices.

        scores: accumulated per-slot scores [L, H, S] (None if not needed);
        positions: each slot's original position [L, H, S]; logical_len: the
        sequence's length (the position of its next token).
        """
        num_slots = positions.shape[-1]
        num_evict = num_slots - budget
        if num_evict <= 0:
            return positions.new_empty((*positions.shape[:2], 0), dtype=torch.long)
        priority = self.keep_priority(scores, positions, budget, logical_len)
        # Sort by position first, then (stably) by priority: equal priorities
        # keep their oldest-first order, so the oldest of a tie goes first.
        by_position = positions.argsort(dim=-1, stable=True)
        ranked = priority.gather(-1, by_position).argsort(dim=-1, stable=True)
        return by_position.gather(-1, ranked[..., :num_evict])
