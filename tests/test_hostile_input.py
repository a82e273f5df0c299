"""Hostile requests by raw HTTP: each gets its 4xx in OpenAI's error shape,
fast, and leaves the engine serving with its KV pool whole."""

import asyncio
import sys
import time

import httpx
import pytest
from live_server import MODEL_NAME, wait_pool_whole
from test_server_errors import assert_error

from server import ServerSettings, build_app
from server.limits import DEFAULT_MAX_REQUEST_BYTES
from server.protocol import MAX_STOP_STRINGS

CHAT = [{"role": "user", "content": "Hi"}]
JSON = {"content-type": "application/json"}


@pytest.fixture(autouse=True)
def _pool_is_whole_after(live_server):
    yield
    wait_pool_whole(live_server)


def post_raw(server, path: str, content) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", content=content, headers=JSON, timeout=60)


def test_body_over_the_limit_is_413(live_server):
    big = b'{"prompt": "' + b"a" * DEFAULT_MAX_REQUEST_BYTES + b'"}'
    r = post_raw(live_server, "/v1/completions", big)
    assert_error(r, 413, code="request_too_large")


def test_chunked_body_over_the_limit_is_413(live_server):
    # No Content-Length: the limit must hold while the body streams in.
    def chunks():
        yield b'{"prompt": "'
        for _ in range(DEFAULT_MAX_REQUEST_BYTES // 65536 + 2):
            yield b"a" * 65536
        yield b'"}'

    r = post_raw(live_server, "/v1/completions", chunks())
    assert_error(r, 413, code="request_too_large")


def test_the_limit_is_configurable(live_server):
    settings = ServerSettings(MODEL_NAME, max_request_bytes=1000)
    app = build_app(live_server.app.state.engine, settings, None)

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            r = await c.post("/detokenize", json={"tokens": [1] * 1000})
            assert_error(r, 413, code="request_too_large")
            ok = await c.post("/detokenize", json={"tokens": [1] * 10})
            assert ok.status_code == 400  # under the limit: on to the handler (no tokenizer)

    asyncio.run(run())


def test_a_body_just_under_the_limit_is_read(live_server):
    # 1 MiB of prompt passes the size limit and fails, fast, on the context.
    body = b'{"prompt": "' + b"a " * (DEFAULT_MAX_REQUEST_BYTES // 2 - 20) + b'"}'
    assert len(body) <= DEFAULT_MAX_REQUEST_BYTES
    assert_error(post_raw(live_server, "/v1/completions", body), 400, "prompt")


@pytest.mark.parametrize("depth", [100, 5_000, 100_000])
def test_deeply_nested_json_is_400(live_server, depth):
    body = b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"
    r = post_raw(live_server, "/v1/completions", body)
    assert_error(r, 400, param=r.json()["error"]["param"])


def test_deeply_nested_messages_are_400(live_server):
    content = "{" + '"a":{' * 5_000 + "}" * 5_000 + "}"
    body = b'{"messages": [{"role": "user", "content": ' + content.encode() + b"}]}"
    r = post_raw(live_server, "/v1/chat/completions", body)
    assert r.status_code == 400
    assert_error(r, 400, param=r.json()["error"]["param"])


@pytest.mark.parametrize(
    "content",
    [b'{"prompt": "\xff\xfe bad"}', b'{"prompt": "ok", "user": "\xc3\x28"}', b"\x80\x81"],
)
def test_invalid_utf8_is_400(live_server, content):
    assert_error(post_raw(live_server, "/v1/completions", content), 400)


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", "NaN"),
        ("top_p", "NaN"),
        ("min_p", "NaN"),
        ("repetition_penalty", "Infinity"),
        ("presence_penalty", "-Infinity"),
        ("kv_ratio", "NaN"),
        ("tau_init", "Infinity"),
        ("max_tokens", "Infinity"),
        ("seed", "NaN"),
    ],
)
def test_nan_and_infinity_are_400(live_server, field, value):
    body = f'{{"prompt": "x", "max_tokens": 2, "{field}": {value}}}'.replace(
        '"max_tokens": 2, "max_tokens"', '"max_tokens"'
    )
    r = post_raw(live_server, "/v1/completions", body.encode())
    assert_error(r, 400, field)


@pytest.mark.parametrize("prompt", [[-1], [10**9], [1, 2, 10**30], [[5, 6], [-(10**20)]], [1.5, 2]])
def test_token_ids_outside_the_vocabulary_are_400(live_server, prompt):
    r = httpx.post(f"{live_server.url}/v1/completions", json={"prompt": prompt, "max_tokens": 2})
    error = assert_error(r, 400, param=r.json()["error"]["param"])
    assert error["param"] is not None and error["param"].startswith("prompt")


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "x", "n": 10**6}, "n"),
        ({"prompt": "x", "n": 129}, "n"),
        ({"prompt": "x", "max_tokens": 10**12}, "prompt"),
        ({"prompt": "x", "max_tokens": 10**40}, "prompt"),
        ({"prompt": "x", "seed": 2**64}, "seed"),
        ({"prompt": "x", "logprobs": 10**9}, "logprobs"),
    ],
)
def test_numbers_far_past_the_limits_are_400(live_server, body, param):
    start = time.monotonic()
    r = httpx.post(f"{live_server.url}/v1/completions", json=body, timeout=60)
    assert_error(r, 400, param)
    assert time.monotonic() - start < 10


def test_chat_max_tokens_far_past_the_limit_is_400(live_server):
    body = {"messages": CHAT, "max_completion_tokens": 10**15}
    r = httpx.post(f"{live_server.url}/v1/chat/completions", json=body)
    assert_error(r, 400, "messages")


def test_a_thousand_stop_strings_are_400(live_server):
    stops = [f"s{i}" for i in range(1000)]
    r = httpx.post(f"{live_server.url}/v1/completions", json={"prompt": "x", "stop": stops})
    assert_error(r, 400, "stop")
    ok = {"prompt": "x", "max_tokens": 2, "stop": stops[:MAX_STOP_STRINGS]}
    assert httpx.post(f"{live_server.url}/v1/completions", json=ok).status_code == 200


@pytest.mark.parametrize("role", [None, 7, {"name": "user"}])
def test_chat_roles_that_are_not_strings_are_400(live_server, role):
    # Any string goes to the chat template, as vLLM does (tests/test_server_vllm_extras.py).
    body = {"messages": [{"role": role, "content": "hi"}]}
    r = httpx.post(f"{live_server.url}/v1/chat/completions", json=body)
    assert_error(r, 400, "messages.0.role")


@pytest.mark.parametrize("messages", [[], None, {}, "hi"])
def test_empty_or_malformed_message_lists_are_400(live_server, messages):
    r = httpx.post(f"{live_server.url}/v1/chat/completions", json={"messages": messages})
    assert_error(r, 400, "messages")


def test_a_model_that_looks_like_a_path_is_404_and_touches_no_disk(live_server):
    real = str(live_server.engine.model_path)
    paths = ["/etc/passwd", "../../../../etc/passwd", real, f"{real}/config.json", "~/.ssh"]
    opened: list[str] = []

    def audit(event: str, args: tuple) -> None:
        if event in ("open", "os.listdir", "os.scandir", "os.stat") and args:
            opened.append(str(args[0]))

    sys.addaudithook(audit)  # audit hooks cannot be removed: this one only records
    for path in paths:
        for route, body in [
            ("/v1/completions", {"model": path, "prompt": "x"}),
            ("/v1/chat/completions", {"model": path, "messages": CHAT}),
            ("/tokenize", {"model": path, "prompt": "x"}),
        ]:
            opened.clear()
            r = httpx.post(f"{live_server.url}{route}", json=body)
            assert_error(r, 404, "model", "model_not_found")
            touched = [p for p in opened if path.rstrip("/") in p or "passwd" in p]
            assert not touched, touched


@pytest.mark.parametrize("n_tokens", [3_000, 50_000])
def test_a_request_bigger_than_the_whole_pool_is_400_at_once(live_server, n_tokens):
    pool_tokens = live_server.engine.kv.num_total_blocks * live_server.engine.kv.block_size
    assert n_tokens > pool_tokens
    start = time.monotonic()
    body = {"prompt": [1] * n_tokens, "max_tokens": 1}
    r = httpx.post(f"{live_server.url}/v1/completions", json=body, timeout=60)
    assert_error(r, 400, "prompt")
    assert time.monotonic() - start < 10  # refused, never queued behind a pool it cannot fit


def test_max_tokens_past_the_pool_is_400_at_once(live_server):
    body = {"prompt": [1, 2, 3], "max_tokens": live_server.engine.max_model_len, "n": 128}
    start = time.monotonic()
    r = httpx.post(f"{live_server.url}/v1/completions", json=body, timeout=60)
    assert_error(r, 400, "prompt")
    assert time.monotonic() - start < 10


def test_the_server_still_serves_after_all_that(live_server):
    body = {"model": MODEL_NAME, "prompt": "The sea is", "max_tokens": 4, "temperature": 0}
    r = httpx.post(f"{live_server.url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("length", "stop")
    wait_pool_whole(live_server)
    assert live_server.engine.kv.num_used_blocks == 0
