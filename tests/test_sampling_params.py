"""SamplingParams: vLLM's names, normalisation and validation."""

import math

import pytest

from engine.runtime.sampling_params import MAX_LOGPROBS, SamplingParams


def test_defaults_are_valid_and_vllm_like():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.max_tokens, p.min_tokens, p.logprobs) == (16, 0, None)
    assert p.stop == [] and p.stop_token_ids == []
    assert not p.greedy


def test_a_single_stop_string_becomes_a_list():
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=["a", "b"]).stop == ["a", "b"]
    assert SamplingParams(stop=None).stop == []


def test_stop_token_ids_none_becomes_empty():
    assert SamplingParams(stop_token_ids=None).stop_token_ids == []


def test_top_k_minus_one_means_off():
    assert SamplingParams(top_k=-1).top_k == 0


@pytest.mark.parametrize(
    "temperature, greedy", [(0.0, True), (1e-6, True), (1e-4, False), (0.7, False)]
)
def test_greedy_below_epsilon(temperature, greedy):
    assert SamplingParams(temperature=temperature).greedy is greedy


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n": 4},
        {"temperature": 0.0},
        {"top_p": 1.0},
        {"top_p": 1e-9},
        {"top_k": 1},
        {"min_p": 0.0},
        {"min_p": 1.0},
        {"presence_penalty": -2.0, "frequency_penalty": 2.0},
        {"presence_penalty": 2.0, "frequency_penalty": -2.0},
        {"repetition_penalty": 0.01},
        {"max_tokens": 1},
        {"max_tokens": None, "min_tokens": 1000},
        {"max_tokens": 5, "min_tokens": 5},
        {"logprobs": 0},
        {"logprobs": MAX_LOGPROBS},
        {"stop_token_ids": [0, 2]},
        {"seed": 0},
        {"prompt_logprobs": 0},
        {"prompt_logprobs": MAX_LOGPROBS},
        {"logit_bias": {0: -100.0, 7: 100, 9: 0.5}},
    ],
)
def test_boundary_values_are_accepted(kwargs):
    p = SamplingParams(**kwargs)
    for name, value in kwargs.items():
        assert getattr(p, name) == value


@pytest.mark.parametrize(
    "field, value",
    [
        ("n", 0),
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_p", math.nan),
        ("top_k", -2),
        ("min_p", -0.01),
        ("min_p", 1.5),
        ("presence_penalty", 2.01),
        ("presence_penalty", -2.5),
        ("frequency_penalty", 3.0),
        ("frequency_penalty", -2.01),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("max_tokens", 0),
        ("max_tokens", -3),
        ("min_tokens", -1),
        ("logprobs", -1),
        ("logprobs", MAX_LOGPROBS + 1),
        ("stop", [""]),
        ("stop", ["ok", 3]),
        ("stop", ""),
        ("stop_token_ids", [-1]),
        ("stop_token_ids", [1, "2"]),
        ("prompt_logprobs", -1),
        ("prompt_logprobs", MAX_LOGPROBS + 1),
        ("logit_bias", {"5": 1.0}),  # offline keys are ints, as vLLM's
        ("logit_bias", {True: 1.0}),
        ("logit_bias", {5: 100.5}),
        ("logit_bias", {5: -101}),
        ("logit_bias", {5: math.nan}),
        ("logit_bias", {5: "1"}),
    ],
)
def test_bad_value_raises_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field} "):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens_is_refused():
    with pytest.raises(ValueError, match=r"^min_tokens must not exceed max_tokens"):
        SamplingParams(max_tokens=4, min_tokens=5)


def test_error_message_shows_the_bad_value():
    with pytest.raises(ValueError, match=r"got -0\.5"):
        SamplingParams(temperature=-0.5)


def test_kv_fields_default_to_none_and_keep_the_readme_spelling():
    assert SamplingParams().kv_overrides() == {}
    p = SamplingParams(kv_policy="h2o", kv_ratio=0.3)
    assert (p.kv_policy, p.kv_ratio, p.kv_min_tokens) == ("h2o", 0.3, None)
    assert p.kv_overrides() == {"kv_policy": "h2o", "kv_ratio": 0.3}
    # The KV fields are keyword-only: positions stay vLLM's.
    assert SamplingParams(2, 0.5).n == 2 and SamplingParams(2, 0.5).temperature == 0.5


@pytest.mark.parametrize(
    "field, value",
    [
        ("kv_policy", "lru"),
        ("kv_ratio", 0.0),
        ("kv_ratio", math.nan),
        ("kv_max_tokens", 0),
        ("kv_min_tokens", -1),
        ("recent_ratio", 1.5),
        ("sink_tokens", -1),
        ("tau_init", 0.0),
        ("tau_end", -1.0),
    ],
)
def test_bad_kv_value_raises_naming_the_field(field, value):
    # Refused as the params are built, by KVPolicySettings's own rule.
    with pytest.raises(ValueError, match=rf"^{field} must be "):
        SamplingParams(**{field: value})


def test_logit_bias_errors_name_the_token():
    with pytest.raises(ValueError, match=r"logit_bias value for token 42 must be in \[-100, 100\]"):
        SamplingParams(logit_bias={42: 250.0})
    with pytest.raises(ValueError, match="logit_bias key 'x' is not an integer token id"):
        SamplingParams(logit_bias={"x": 1.0})
