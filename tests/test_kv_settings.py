"""KVPolicySettings: the one declaration of the KV settings, their checks, and
the two views derived from it (per-request overrides, engine defaults)."""

import math
from dataclasses import fields

import numpy as np
import pytest

from kv_manager.policies import (
    KV_POLICY_FIELDS,
    KV_SETTINGS,
    POLICY_NAMES,
    KVPolicyDefaults,
    KVPolicyOverrides,
    KVPolicySettings,
)


def test_the_one_default_is_keyformer_at_half():
    s = KVPolicySettings()
    assert (s.kv_policy, s.kv_ratio, s.kv_max_tokens, s.kv_min_tokens) == (
        "keyformer",
        0.5,
        None,
        128,
    )
    assert (s.recent_ratio, s.sink_tokens, s.tau_init, s.tau_end) == (0.3, 4, 1.0, 2.0)
    assert s.evicts and s.budget(1000) == 500


def test_every_setting_is_described():
    assert [s.name for s in KV_SETTINGS] == list(KV_POLICY_FIELDS)
    for s in KV_SETTINGS:
        assert s.help and s.kind in (str, int, float)
        assert s.default == getattr(KVPolicySettings(), s.name)
        s.check(s.default)  # every default passes its own rule
    by_name = {s.name: s for s in KV_SETTINGS}
    assert by_name["kv_max_tokens"].nullable and not by_name["kv_min_tokens"].nullable
    assert (
        by_name["kv_policy"].limits.choices
        == POLICY_NAMES
        == ("full", "window", "streaming", "h2o", "keyformer", "snapkv")
    )


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("kv_policy", "lru", "kv_policy must be one of ['full', 'window', 'streaming', 'h2o', "),
        ("kv_ratio", 0.0, "kv_ratio must be in (0, 1], got 0.0"),
        ("kv_ratio", 1.01, "kv_ratio must be in (0, 1], got 1.01"),
        ("kv_ratio", math.nan, "kv_ratio must be in (0, 1], got nan"),
        ("kv_ratio", "half", "kv_ratio must be a number, got 'half'"),
        ("kv_max_tokens", 0, "kv_max_tokens must be at least 1, got 0"),
        ("kv_min_tokens", -1, "kv_min_tokens must be non-negative, got -1"),
        ("kv_min_tokens", 1.5, "kv_min_tokens must be an integer, got 1.5"),
        ("kv_min_tokens", True, "kv_min_tokens must be an integer, got True"),
        ("recent_ratio", 1.5, "recent_ratio must be in [0, 1], got 1.5"),
        ("sink_tokens", -2, "sink_tokens must be non-negative, got -2"),
        ("tau_init", 0.0, "tau_init must be positive, got 0.0"),
        ("tau_end", math.inf, "tau_end must be positive, got inf"),
        ("kv_squeeze_min_ratio", 1.5, "kv_squeeze_min_ratio must be in [0, 1], got 1.5"),
        ("kv_squeeze_min_ratio", -0.1, "kv_squeeze_min_ratio must be in [0, 1], got -0.1"),
    ],
)
def test_a_bad_value_is_refused_naming_the_setting(name, value, message):
    for build in (KVPolicySettings, KVPolicyOverrides, KVPolicyDefaults):
        with pytest.raises(ValueError) as e:
            build(**{name: value})
        assert str(e.value).startswith(message), (build, str(e.value))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kv_ratio": 1.0},
        {"kv_ratio": 1},  # an int is a number
        {"kv_ratio": np.float32(0.25)},
        {"kv_min_tokens": np.int64(0)},
        {"kv_max_tokens": 1},
        {"recent_ratio": 0.0},
        {"sink_tokens": 0},
        {"kv_policy": "full"},
    ],
)
def test_boundary_values_are_accepted(kwargs):
    settings = KVPolicySettings(**kwargs)
    for name, value in kwargs.items():
        assert getattr(settings, name) == value


def test_overrides_are_optional_and_keyword_only():
    o = KVPolicyOverrides()
    assert o.kv_overrides() == {}
    assert all(f.default is None and f.kw_only for f in fields(KVPolicyOverrides))
    o = KVPolicyOverrides(kv_policy="h2o", kv_ratio=0.3)
    assert o.kv_overrides() == {"kv_policy": "h2o", "kv_ratio": 0.3}
    merged = KVPolicySettings().with_overrides(**o.kv_overrides())
    assert (merged.kv_policy, merged.kv_ratio, merged.kv_min_tokens) == ("h2o", 0.3, 128)


def test_defaults_view_has_the_declared_defaults():
    d = KVPolicyDefaults()
    assert d.kv_policy_settings() == KVPolicySettings()
    assert [f.name for f in fields(KVPolicyDefaults)] == list(KV_POLICY_FIELDS)
    assert KVPolicyDefaults(kv_policy="full").kv_policy_settings().evicts is False


def test_unknown_override_is_named():
    with pytest.raises(ValueError, match="kv_polcy"):
        KVPolicySettings().with_overrides(kv_polcy="h2o")
