"""The request models' KV fields: derived from KVPolicySettings, documented in
the schema, refused with the field named, passed through to SamplingParams."""

import pytest
from pydantic import ValidationError

from kv_manager.policies import KV_POLICY_FIELDS, KV_SETTINGS
from server.params import build_sampling_params
from server.protocol import ChatCompletionRequest, CompletionRequest

CHAT = [{"role": "user", "content": "hi"}]
REQUESTS = [(CompletionRequest, {"prompt": "x"}), (ChatCompletionRequest, {"messages": CHAT})]


@pytest.mark.parametrize("model", [CompletionRequest, ChatCompletionRequest])
def test_schema_lists_every_kv_field_with_type_help_and_range(model):
    props = model.model_json_schema()["properties"]
    for s in KV_SETTINGS:
        prop = props[s.name]
        assert prop["default"] is None
        assert prop["description"].startswith(s.help)
        (value, null) = prop["anyOf"]
        assert null == {"type": "null"}
        assert value["type"] == {str: "string", int: "integer", float: "number"}[s.kind]
        if s.limits.choices:
            assert value["enum"] == list(s.limits.choices)
    kv_ratio = {"type": "number", "exclusiveMinimum": 0.0, "maximum": 1.0}
    assert props["kv_ratio"]["anyOf"][0] == kv_ratio
    assert props["kv_max_tokens"]["anyOf"][0]["minimum"] == 1


@pytest.mark.parametrize("model, base", REQUESTS)
@pytest.mark.parametrize(
    "field, value",
    [
        ("kv_policy", "lru"),
        ("kv_ratio", 1.5),
        ("kv_ratio", 0),
        ("kv_target_mass", 0),
        ("kv_target_mass", 1.5),
        ("kv_max_tokens", 0),
        ("kv_min_tokens", -1),
        ("kv_min_tokens", 2.5),
        ("recent_ratio", -0.1),
        ("sink_tokens", -1),
        ("tau_init", 0),
        ("tau_end", -2.0),
        ("kv_squeeze_min_ratio", 2),
    ],
)
def test_bad_kv_value_is_refused_naming_the_field(model, base, field, value):
    with pytest.raises(ValidationError) as e:
        model.model_validate({**base, field: value})
    assert [err["loc"] for err in e.value.errors()] == [(field,)]


@pytest.mark.parametrize("model, base", REQUESTS)
def test_kv_fields_reach_sampling_params(model, base):
    kv = {
        "kv_policy": "streaming",
        "kv_ratio": 0.25,
        "kv_max_tokens": 64,
        "kv_min_tokens": 0,
        "recent_ratio": 0.5,
        "sink_tokens": 2,
        "tau_init": 0.5,
        "tau_end": 3.0,
        "score_window": 16,
        "snapkv_kernel": 5,
        "snapkv_pooling": "avg",
        "decode_scoring": "frozen",
        "kv_pressure": "squeeze",
        "kv_squeeze_min_ratio": 0.5,
    }
    # kv_target_mass is the other budget rule: given instead of kv_ratio.
    assert set(kv) | {"kv_target_mass"} == set(KV_POLICY_FIELDS)
    request = model.model_validate({**base, **kv})
    assert build_sampling_params(request, 8, None).kv_overrides() == kv
    mass = {**kv, "kv_policy": "h2o", "kv_target_mass": 0.95}
    del mass["kv_ratio"]
    request = model.model_validate({**base, **mass})
    assert build_sampling_params(request, 8, None).kv_overrides() == mass
    unset = model.model_validate(base)
    assert build_sampling_params(unset, 8, None).kv_overrides() == {}
