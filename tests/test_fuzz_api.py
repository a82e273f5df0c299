"""Property-based fuzzing of every route against the app's own OpenAPI schema
(schemathesis): no request, valid or not, gets a 5xx; every 4xx has OpenAI's
error shape; afterwards the server still serves and its KV pool is whole.

The fuzz server runs the real SmolLM2 with a short context (FUZZ_CONTEXT
tokens), so the largest `max_tokens` and `n` the schema allows still finish in
a few seconds; nothing in the generated requests is clamped.
"""

import os
from collections import Counter

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from live_server import LiveServer, wait_pool_whole
from schemathesis.generation.modes import GenerationMode

from server import ServerSettings, create_app

FUZZ_CONTEXT = 40
# Per route and generation mode (valid, invalid); KEYSERVE_FUZZ_EXAMPLES runs longer.
MAX_EXAMPLES = int(os.environ.get("KEYSERVE_FUZZ_EXAMPLES", "25"))
MODEL = "fuzz-model"


@pytest.fixture(scope="module")
def fuzz_server():
    from engine import EngineConfig, LLMEngine

    engine = LLMEngine(
        EngineConfig(kv_cache_bytes="64MiB", max_model_len=FUZZ_CONTEXT, kv_policy="keyformer")
    )
    with LiveServer(create_app(engine, ServerSettings(model_name=MODEL))) as server:
        server.engine = engine
        yield server


@pytest.fixture(scope="module")
def fuzz_schema(fuzz_server):
    return schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")


# Every route in the published schema (checked below, so a new route is fuzzed too).
ROUTES = [
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("GET", "/v1/models"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("GET", "/version"),
    ("GET", "/health"),
    ("GET", "/metrics"),
]


def check_response(response) -> None:
    status = response.status_code
    assert status < 500, f"{status}: {response.text[:500]}"
    if status >= 400:
        body = response.json()
        assert list(body) == ["error"], body
        error = body["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert isinstance(error["message"], str) and error["message"]
        assert isinstance(error["type"], str) and error["type"]
        assert error["param"] is None or isinstance(error["param"], str)


def _operations(schema) -> dict:
    ops = {}
    for result in schema.get_all_operations():
        op = result.ok()
        ops[(op.method.upper(), op.path)] = op
    return ops


def test_the_fuzz_covers_every_route(fuzz_schema):
    assert sorted(_operations(fuzz_schema)) == sorted(ROUTES)


# Valid and invalid requests for the routes with a body; the GET routes take no
# input, so there is nothing invalid to generate for them.
CASES = [(m, p, GenerationMode.POSITIVE) for m, p in ROUTES] + [
    (m, p, GenerationMode.NEGATIVE) for m, p in ROUTES if m == "POST"
]


@pytest.mark.parametrize("method, path, mode", CASES)
def test_no_5xx_and_openai_errors(fuzz_schema, method, path, mode):
    operation = _operations(fuzz_schema)[(method, path)]
    calls = []
    statuses: Counter = Counter()

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,  # the same examples every run: a failure reproduces
        database=None,
    )
    def fuzz(case) -> None:
        calls.append(case)
        response = case.call(timeout=120)
        statuses[response.status_code] += 1
        check_response(response)

    fuzz()
    assert calls
    print(f"{method} {path} {mode.value}: {len(calls)} examples, statuses {dict(statuses)}")
    if mode == GenerationMode.POSITIVE:
        # Valid requests must mostly get through (a 400 for every one would test nothing);
        # completions and chat also fail on the short context, so one 200 is enough there.
        assert statuses[200] > 0, statuses


def test_still_serving_and_pool_whole_after_the_fuzz(fuzz_server):
    body = {"model": MODEL, "prompt": "The sea is", "max_tokens": 4, "temperature": 0}
    r = httpx.post(f"{fuzz_server.url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    wait_pool_whole(fuzz_server, timeout=120)
    assert fuzz_server.engine.kv.num_used_blocks == 0
    assert fuzz_server.app.state.engine.healthy
