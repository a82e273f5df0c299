"""A budget chosen from a quality target (kv_target_mass) instead of a ratio.

At the end of its prompt a sequence keeps the fewest keys whose cut still
holds `target` of the accumulated score, in every (layer, KV head):

    k_lh = min { k : score kept by the policy's own cut to k slots
                     >= target * score of every key held, in (layer, head) }
    k    = max over (layer, head) of k_lh

The largest over layers and heads, because the layout keeps one slot count
for all of them (every other (layer, head) then holds at least its target).

What counts: every key the sequence holds at that point, in the numerator
and the denominator alike. The keys a cut never evicts (the recent window,
w = floor(k * recent_ratio) of the newest) are kept, so their score counts
toward the target; the window grows with k, which the policy's cut accounts
for. A prompt compressed while it prefilled (kv_max_tokens below the prompt,
cut at every chunk) is weighed over the keys it still holds at its end: the
score of keys cut earlier is gone from both sides.

For h2o and keyformer the cut to k keeps a superset of the cut to k - 1:
either the window stays and one more of the highest scores is kept, or the
newest key outside it joins the window and the same number of highest scores
is taken from the rest (the next one replacing it, if it was among them). So
the kept score only grows with k, and a bisection finds the smallest k (for
a policy whose cuts are not nested, a k that holds the target).
"""

import torch

from kv_manager.policies.base import EvictionPolicy


def keys_for_mass(
    policy: EvictionPolicy,
    scores: torch.Tensor,
    positions: torch.Tensor,
    logical_len: int,
    target: float,
) -> int:
    """The smallest slot count k in [1, slots] whose cut by `policy` keeps at
    least `target` of the score in every (layer, head).

    scores, positions: [L, H, slots], the sequence's accumulated scores and
    original positions; logical_len: its length (the position of its next
    token). Sums run in float64, so the choice does not hang on the order of
    a float32 sum. NOTE: about log2(slots) cuts, once per sequence.
    """
    if not policy.needs_scores:
        raise ValueError(f"{type(policy).__name__} has no scores to weigh")
    weights = scores.double()
    total = weights.sum(-1)
    need = target * total

    def holds(k: int) -> bool:
        victims = policy.select_victims(scores, positions, k, logical_len)
        return bool((total - weights.gather(-1, victims).sum(-1) >= need).all())

    low, high = 1, positions.shape[-1]  # keeping every slot holds the whole score
    while low < high:
        mid = (low + high) // 2
        if holds(mid):
            high = mid
        else:
            low = mid + 1
    return max(high, 1)
