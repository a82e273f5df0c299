"""Score-based policies: H2O and Keyformer keep a recent window plus the
highest accumulated scores. They differ in how a step's score is computed
(plain softmax for H2O; Gumbel noise and a rising temperature for Keyformer,
see `kv_manager.scoring`), not in how slots are chosen."""

import torch

from kv_manager.policies.base import EvictionPolicy


class HeavyHitterPolicy(EvictionPolicy):
    needs_scores = True
    # Keyformer's score: Gumbel-regularized with a temperature schedule.
    uses_gumbel = False

    def keep_priority(self, scores, positions, budget, logical_len) -> torch.Tensor:
        recent = positions >= self.recent_start(budget, logical_len)
        return scores.float().masked_fill(recent, float("inf"))

    def recent_start(self, budget: int, logical_len: int) -> int:
        """The first position of the recent window, which is never evicted:
        the keep-priority is the score below it and +inf from it on."""
        return logical_len - self.settings.recent_window(budget)


class H2OPolicy(HeavyHitterPolicy):
    pass


class KeyformerPolicy(HeavyHitterPolicy):
    uses_gumbel = True
