"""Score-based policies: H2O and Keyformer keep a recent window plus the
highest accumulated scores. They differ in how a step's score is computed
(plain softmax for H2O; Gumbel noise and a rising temperature for Keyformer,
see `kv_manager.scoring`), not in how slots are chosen."""

import torch

from kv_manager.policies.base import EvictionPolicy, recent_mask


class HeavyHitterPolicy(EvictionPolicy):
    needs_scores = True
    # Keyformer's score: Gumbel-regularized with a temperature schedule.
    uses_gumbel = False

    def keep_priority(self, scores, positions, budget, logical_len) -> torch.Tensor:
        window = self.settings.recent_window(budget)
        recent = recent_mask(positions, window, logical_len)
        return scores.float().masked_fill(recent, float("inf"))


class H2OPolicy(HeavyHitterPolicy):
    pass


class KeyformerPolicy(HeavyHitterPolicy):
    uses_gumbel = True
