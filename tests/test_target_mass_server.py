"""kv_target_mass over HTTP: the field is taken, usage says the budget it
chose, /metrics counts the choices, and bad values are 400s naming it."""

import httpx
import pytest
import torch
from live_server import LiveServer, metric
from test_server_errors import assert_error
from tiny_models import build_tiny_model

from engine import EngineConfig, LLMEngine, SamplingParams
from server import ServerSettings, create_app

PROMPT = torch.randint(3, 250, (48,), generator=torch.Generator().manual_seed(9)).tolist()
CONFIG = dict(
    skip_tokenizer_init=True, dtype="float32", block_size=4, kv_cache_blocks=64,
    max_num_batched_tokens=64, kv_policy="h2o", kv_min_tokens=0, recent_ratio=0.25,
)  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_model("llama", tmp_path_factory.mktemp("llama"))


def _offline_budget(engine: LLMEngine, **kv) -> int:
    """The budget the engine chooses for PROMPT, run offline."""
    engine.add_request("offline", PROMPT, SamplingParams(max_tokens=2, temperature=0, **kv))
    while engine.has_unfinished_requests():
        outs = engine.step()
    return outs[0].kv.budget


@pytest.fixture(scope="module")
def server(folder):
    engine = LLMEngine(EngineConfig(model=str(folder), **CONFIG))
    expected = {m: _offline_budget(engine, kv_target_mass=m) for m in (0.5, 0.9)}
    with LiveServer(create_app(engine, ServerSettings(model_name="tiny"))) as s:
        s.engine, s.expected = engine, expected
        yield s


def _post(server, route="completions", **fields):
    if route == "completions":
        body = {"model": "tiny", "prompt": PROMPT}
    else:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    body |= {"max_tokens": 3, "temperature": 0, **fields}
    return httpx.post(f"{server.url}/v1/{route}", json=body, timeout=60)


@pytest.mark.parametrize("target", [0.5, 0.9])
def test_usage_says_the_budget_the_target_chose(server, target):
    before = metric(server, "keyserve:kv_target_mass_budget_fraction_count")
    r = _post(server, kv_target_mass=target)
    assert r.status_code == 200, r.text
    details = r.json()["usage"]["kv_cache_details"]
    budget = server.expected[target]
    assert details == {
        "policy": "h2o",
        "budget_tokens": budget,
        "squeezed": False,
        "squeezed_budget_tokens": None,
        "target_mass": target,
    }
    assert 1 <= budget < len(PROMPT)
    assert metric(server, "keyserve:kv_target_mass_budget_fraction_count") == before + 1
    assert server.engine.kv.num_used_blocks == 0


def test_a_lower_target_keeps_fewer_keys(server):
    assert server.expected[0.5] < server.expected[0.9]


@pytest.mark.parametrize(
    "fields",
    [
        {"kv_target_mass": 0},
        {"kv_target_mass": 1.5},
        {"kv_target_mass": "most"},
        {"kv_target_mass": 0.9, "kv_ratio": 0.5},
        {"kv_target_mass": 0.9, "kv_policy": "window"},
        {"kv_target_mass": 0.9, "kv_policy": "streaming"},
    ],
)
def test_bad_targets_are_a_400_naming_the_field(server, fields):
    error = assert_error(_post(server, **fields), 400, "kv_target_mass")
    assert "kv_target_mass" in error["message"]


@pytest.mark.parametrize("value", [0, 1.5])
def test_chat_refuses_a_target_out_of_range_too(server, value):
    # (The tiny model has no chat template: only what the body's schema refuses.)
    assert_error(_post(server, "chat/completions", kv_target_mass=value), 400, "kv_target_mass")


def test_full_ignores_the_target(server):
    r = _post(server, kv_target_mass=0.9, kv_policy="full")
    assert r.status_code == 200, r.text
    details = r.json()["usage"]["kv_cache_details"]
    assert details["budget_tokens"] is None and details["target_mass"] is None


def test_a_server_default_target_gives_way_to_a_requests_ratio(folder):
    engine = LLMEngine(EngineConfig(model=str(folder), kv_target_mass=0.9, **CONFIG))
    with LiveServer(create_app(engine, ServerSettings(model_name="tiny"))) as s:
        default = _post(s).json()["usage"]["kv_cache_details"]
        ratio = _post(s, kv_ratio=0.5).json()["usage"]["kv_cache_details"]
        window = _post(s, kv_policy="window").json()["usage"]["kv_cache_details"]
    assert default["target_mass"] == 0.9 and default["budget_tokens"] < len(PROMPT)
    assert (ratio["target_mass"], ratio["budget_tokens"]) == (None, len(PROMPT) // 2)
    assert (window["policy"], window["target_mass"], window["budget_tokens"]) == (
        "window",
        None,
        len(PROMPT) // 2,  # the default kv_ratio, 0.5
    )
    assert engine.kv.num_used_blocks == 0
