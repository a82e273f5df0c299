"""Eviction policies: full, window, streaming, h2o, keyformer."""

from kv_manager.policies.base import EvictionPolicy
from kv_manager.policies.heavy_hitters import H2OPolicy, HeavyHitterPolicy, KeyformerPolicy
from kv_manager.policies.settings import KV_POLICY_FIELDS, POLICY_NAMES, KVPolicySettings
from kv_manager.policies.simple import FullPolicy, StreamingPolicy, WindowPolicy

_POLICIES: dict[str, type[EvictionPolicy]] = {
    "full": FullPolicy,
    "window": WindowPolicy,
    "streaming": StreamingPolicy,
    "h2o": H2OPolicy,
    "keyformer": KeyformerPolicy,
}


def make_policy(settings: KVPolicySettings) -> EvictionPolicy:
    return _POLICIES[settings.kv_policy](settings)


__all__ = [
    "KV_POLICY_FIELDS",
    "POLICY_NAMES",
    "EvictionPolicy",
    "FullPolicy",
    "H2OPolicy",
    "HeavyHitterPolicy",
    "KVPolicySettings",
    "KeyformerPolicy",
    "StreamingPolicy",
    "WindowPolicy",
    "make_policy",
]
