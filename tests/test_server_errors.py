"""Every client error by raw HTTP: its status, the OpenAI error shape, and the
offending param. A client's mistake is never a 500."""

import asyncio

import httpx
import pytest
from live_server import MODEL_NAME, wait_pool_whole

from server import ServerSettings, build_app

LONG = "hello " * 2000  # past the 64 MiB pool's context (about 1400 tokens)
CHAT = [{"role": "user", "content": "Hi"}]


@pytest.fixture(autouse=True)
def _pool_is_whole_after(live_server):
    yield
    wait_pool_whole(live_server)


def assert_error(response: httpx.Response, status: int, param=None, code=None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"]
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code
    return error


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "temperature": 2.5}, "temperature"),
        ({"prompt": "x", "temperature": -0.1}, "temperature"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "logprobs": 21}, "logprobs"),
        ({"prompt": "x", "max_tokens": 100_000}, "prompt"),  # prompt + max_tokens > context
        ({"prompt": LONG}, "prompt"),  # the prompt alone fills the context
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({}, "prompt"),
        ({"prompt": "x", "kv_policy": "lru"}, "kv_policy"),
        ({"prompt": "x", "kv_policy": "keyformer", "kv_ratio": 1.5}, "kv_ratio"),
        ({"prompt": "x", "kv_polcy": "keyformer"}, "kv_polcy"),  # a typo is not ignored
        ({"prompt": "x", "kv_policy": "snapkv", "score_window": 0}, "score_window"),
        ({"prompt": "x", "kv_policy": "snapkv", "score_window": 2.5}, "score_window"),
        ({"prompt": "x", "kv_policy": "snapkv", "snapkv_pooling": "min"}, "snapkv_pooling"),
        ({"prompt": "x", "decode_scoring": "sometimes"}, "decode_scoring"),
        ({"prompt": "x", "stop_token_ids": [10**9]}, "stop_token_ids"),
        ({"prompt": "x", "top_k": -5}, "top_k"),
        ({"prompt": "x", "best_of": 3}, "best_of"),
        ({"prompt": "x", "logit_bias": {"one": 1}}, "logit_bias"),
        ({"prompt": "x", "logit_bias": {"7": 101}}, "logit_bias.7"),
        ({"prompt": "x", "prompt_logprobs": 21}, "prompt_logprobs"),
        ({"prompt": "x", "prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
        ({"prompt": [[1, 2], [10**9]]}, "prompt"),
    ],
)
def test_completion_bad_request(live_server, body, param):
    r = httpx.post(f"{live_server.url}/v1/completions", json=body)
    assert_error(r, 400, param)


@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": CHAT, "max_tokens": -3}, "max_tokens"),
        ({"messages": CHAT, "temperature": 3}, "temperature"),
        ({"messages": CHAT, "max_tokens": 100_000}, "messages"),
        ({"messages": [{"role": "user", "content": LONG}]}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": 3, "content": "hi"}]}, "messages.0.role"),
        ({"messages": CHAT, "logit_bias": {"1e3": 1}}, "logit_bias"),
        ({"messages": CHAT, "logit_bias": {"100000": 1}}, "logit_bias"),
        ({"messages": CHAT, "prompt_logprobs": -1}, "prompt_logprobs"),
        ({"messages": CHAT, "kv_policy": "nope"}, "kv_policy"),
        ({"messages": CHAT, "top_logprobs": 2}, "top_logprobs"),
        ({"messages": CHAT, "tools": [{"type": "function"}]}, "tools"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages.0.content",
        ),
    ],
)
def test_chat_bad_request(live_server, body, param):
    r = httpx.post(f"{live_server.url}/v1/chat/completions", json=body)
    assert_error(r, 400, param)


@pytest.mark.parametrize(
    "content",
    [b'{"prompt": "x",', b"not json at all", b"[1, 2]", b'"a string"', b""],
)
def test_malformed_body_is_400(live_server, content):
    r = httpx.post(
        f"{live_server.url}/v1/completions",
        content=content,
        headers={"content-type": "application/json"},
    )
    error = assert_error(r, 400)
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_unknown_model_is_404(live_server, path):
    body = {"model": "gpt-4o", "prompt": "x", "messages": CHAT}
    if path.endswith("chat/completions"):
        body.pop("prompt")
    else:
        body.pop("messages")
    r = httpx.post(f"{live_server.url}{path}", json=body)
    error = assert_error(r, 404, "model", "model_not_found")
    assert "gpt-4o" in error["message"]


def test_unknown_route_and_method_keep_the_shape(live_server):
    assert_error(httpx.get(f"{live_server.url}/v1/nothing"), 404)
    assert_error(httpx.get(f"{live_server.url}/v1/completions"), 405)


def test_tokenizer_routes_reject_bad_input(live_server):
    url = live_server.url
    assert_error(httpx.post(f"{url}/detokenize", json={"tokens": [-1]}), 400, "tokens")
    both = {"prompt": "a", "messages": CHAT}
    assert_error(httpx.post(f"{url}/tokenize", json=both), 400, "prompt")


def test_queue_full_is_503(live_server):
    engine = live_server.app.state.engine
    engine.max_waiting = 0  # read by the engine thread at each add
    try:
        r = httpx.post(f"{live_server.url}/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert_error(r, 503, code="queue_full")
    finally:
        engine.max_waiting = None
    ok = httpx.post(f"{live_server.url}/v1/completions", json={"prompt": "x", "max_tokens": 2})
    assert ok.status_code == 200


def test_draining_is_503(live_server):
    engine = live_server.app.state.engine
    engine.start_drain()
    try:
        r = httpx.post(f"{live_server.url}/v1/chat/completions", json={"messages": CHAT})
        assert_error(r, 503, code="draining")
        assert_error(httpx.get(f"{live_server.url}/health"), 503, code="draining")
    finally:
        engine.draining = False


def test_api_key(live_server):
    # A second app over the same engine, with a key; only routes that do not
    # generate are called, so it needs no lifespan of its own.
    app = build_app(
        live_server.app.state.engine, ServerSettings(MODEL_NAME, api_key="s3cret"), None
    )

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            assert_error(await c.get("/v1/models"), 401, code="invalid_api_key")
            wrong = {"authorization": "Bearer s3creT"}
            assert_error(await c.get("/v1/models", headers=wrong), 401, code="invalid_api_key")
            basic = {"authorization": "Basic s3cret"}
            assert_error(await c.get("/v1/models", headers=basic), 401, code="invalid_api_key")
            no_model = await c.post("/v1/completions", json={"prompt": "x"})
            assert_error(no_model, 401, code="invalid_api_key")  # auth comes before parsing
            ok = await c.get("/v1/models", headers={"authorization": "Bearer s3cret"})
            assert ok.status_code == 200 and ok.json()["data"][0]["id"] == MODEL_NAME
            # Probes and Prometheus need no key.
            assert (await c.get("/health")).status_code == 200
            assert (await c.get("/metrics")).status_code == 200

    asyncio.run(run())
