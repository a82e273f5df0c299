"""Eviction policies: full, window, streaming, h2o, keyformer, snapkv."""

from kv_manager.policies.base import EvictionPolicy
from kv_manager.policies.heavy_hitters import (
    H2OPolicy,
    HeavyHitterPolicy,
    KeyformerPolicy,
    SnapKVPolicy,
    pool_neighbours,
)
from kv_manager.policies.sequence import SequencePolicy, make_policy
from kv_manager.policies.settings import (
    KV_POLICY_FIELDS,
    KV_SETTINGS,
    POLICY_NAMES,
    PRESSURE_NAMES,
    KVPolicyDefaults,
    KVPolicyOverrides,
    KVPolicySettings,
    KVSetting,
)
from kv_manager.policies.simple import FullPolicy, StreamingPolicy, WindowPolicy
from kv_manager.policies.target_mass import keys_for_mass

__all__ = [
    "KV_POLICY_FIELDS",
    "KV_SETTINGS",
    "POLICY_NAMES",
    "PRESSURE_NAMES",
    "EvictionPolicy",
    "FullPolicy",
    "H2OPolicy",
    "HeavyHitterPolicy",
    "KVPolicyDefaults",
    "KVPolicyOverrides",
    "KVPolicySettings",
    "KVSetting",
    "KeyformerPolicy",
    "SequencePolicy",
    "SnapKVPolicy",
    "StreamingPolicy",
    "WindowPolicy",
    "keys_for_mass",
    "make_policy",
    "pool_neighbours",
]
