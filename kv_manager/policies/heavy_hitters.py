"""Score-based policies: H2O, Keyformer and SnapKV keep a recent window plus
the highest accumulated scores. They differ in how a step's score is computed
(plain softmax for H2O and SnapKV; Gumbel noise and a rising temperature for
Keyformer, see `kv_manager.scoring`), in which prompt queries add to it (all,
or an observation window: `score_window`), and in SnapKV's pooling of a
prompt key's score over its neighbours."""

import torch
import torch.nn.functional as F

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

    @property
    def pools_prompt(self) -> bool:
        """Whether a prompt cut ranks by `cut_scores` rather than the plain scores."""
        return False

    def cut_scores(
        self, scores: torch.Tensor, positions: torch.Tensor, budget: int, logical_len: int
    ) -> torch.Tensor:
        """The scores a prompt cut ranks by ([L, H, S]): the accumulated ones."""
        return scores


class H2OPolicy(HeavyHitterPolicy):
    pass


class KeyformerPolicy(HeavyHitterPolicy):
    uses_gumbel = True


class SnapKVPolicy(HeavyHitterPolicy):
    """SnapKV (Li et al., 2024): a prompt key's score is the attention of the
    last `score_window` prompt queries (the observation window, which
    `KVPolicySettings.window_start` picks), pooled over its neighbours, so a
    span the question points into is kept whole rather than its peaks alone.
    Generated tokens then add their attention as in H2O (decode_scoring)."""

    @property
    def pools_prompt(self) -> bool:
        return self.settings.snapkv_kernel > 1

    def cut_scores(self, scores, positions, budget, logical_len) -> torch.Tensor:
        kernel = self.settings.snapkv_kernel
        if kernel <= 1:
            return scores
        candidates = positions < self.recent_start(budget, logical_len)
        return pool_neighbours(scores, positions, candidates, kernel, self.settings.snapkv_pooling)


def pool_neighbours(
    scores: torch.Tensor, positions: torch.Tensor, candidates: torch.Tensor, kernel: int, how: str
) -> torch.Tensor:
    """Each slot's score pooled (max or mean) over the `kernel // 2` slots
    before and after it in position order, among `candidates` ([..., S]
    masks; the others count as padding: -inf for max, 0 for the mean, whose
    divisor is always the whole window, as SnapKV's avg_pool1d). An even
    kernel is widened by one. The slots may be in any order (a compacted
    cache): they are sorted by position and put back."""
    radius, S = kernel // 2, scores.shape[-1]
    order = positions.argsort(dim=-1)
    ranked = scores.float().gather(-1, order)
    pad = float("-inf") if how == "max" else 0.0
    ranked = ranked.masked_fill(~candidates.gather(-1, order), pad)
    flat = ranked.reshape(-1, 1, S)
    width = 2 * radius + 1
    if how == "max":
        pooled = F.max_pool1d(flat, width, stride=1, padding=radius)
    else:
        pooled = F.avg_pool1d(flat, width, stride=1, padding=radius, count_include_pad=True)
    return torch.empty_like(ranked).scatter_(-1, order, pooled.view_as(ranked))
