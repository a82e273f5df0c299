"""A request's eviction policy, resolved: its settings, policy and budget."""

from dataclasses import dataclass, replace

from kv_manager.policies.base import EvictionPolicy
from kv_manager.policies.heavy_hitters import H2OPolicy, KeyformerPolicy, SnapKVPolicy
from kv_manager.policies.settings import KVPolicySettings
from kv_manager.policies.simple import FullPolicy, StreamingPolicy, WindowPolicy

_POLICIES: dict[str, type[EvictionPolicy]] = {
    "full": FullPolicy,
    "window": WindowPolicy,
    "streaming": StreamingPolicy,
    "h2o": H2OPolicy,
    "keyformer": KeyformerPolicy,
    "snapkv": SnapKVPolicy,
}


def make_policy(settings: KVPolicySettings) -> EvictionPolicy:
    return _POLICIES[settings.kv_policy](settings)


@dataclass(frozen=True)
class SequencePolicy:
    """How one sequence's cache is cut: the typed KV state a Request carries."""

    settings: KVPolicySettings
    policy: EvictionPolicy
    budget: int | None  # slots kept; None: never evicts
    seed: int  # the request's seed, also Keyformer's noise key
    # kv_target_mass: `budget` is the most the choice can give until the
    # prompt's end, when the engine chooses it (with_budget).
    budget_pending: bool = False

    @classmethod
    def resolve(cls, settings: KVPolicySettings, prompt_len: int, seed: int) -> "SequencePolicy":
        budget = settings.budget(prompt_len)
        return cls(settings, make_policy(settings), budget, seed, settings.chooses_budget)

    def with_budget(self, budget: int) -> "SequencePolicy":
        """This policy with its budget chosen (kv_target_mass)."""
        return replace(self, budget=budget, budget_pending=False)

    @property
    def scores_keys(self) -> bool:
        """Whether attention must add scores to this sequence's slots (h2o, keyformer, snapkv)."""
        return self.policy.needs_scores
