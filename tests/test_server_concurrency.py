"""32 concurrent streaming clients, a third of them leaving mid-stream: the rest
get exactly their solo greedy text, the leavers are aborted, the pool ends whole."""

import asyncio
import json
import time

import httpx
import pytest
from live_server import MODEL_NAME, metric, wait_pool_whole

PROMPTS = ["The capital of France is", "Count: 1, 2, 3,", "My favourite food is", "The sea is"]
NUM_CLIENTS = 32
MAX_TOKENS = 12


def _leaves(i: int) -> bool:
    return i % 3 == 0


def _body(prompt: str, max_tokens: int, stream: bool) -> dict:
    return {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }


async def _client(i: int, http: httpx.AsyncClient) -> str | None:
    """The streamed text, or None for a client that left after its first text."""
    leaves = _leaves(i)
    # Leavers ask for more tokens, so they are surely still running when they go.
    body = _body(PROMPTS[i % len(PROMPTS)], 64 if leaves else MAX_TOKENS, stream=True)
    text = ""
    async with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line:
                continue
            if line == "data: [DONE]":
                return text
            text += json.loads(line.removeprefix("data: "))["choices"][0]["text"]
            if leaves and text:
                return None  # leaving the block closes the connection mid-stream
    raise AssertionError(f"client {i}: the stream ended without [DONE]")


def test_concurrent_streams_with_disconnects(live_server):
    url = live_server.url
    solo = {
        p: httpx.post(f"{url}/v1/completions", json=_body(p, MAX_TOKENS, stream=False)).json()
        for p in PROMPTS
    }
    solo_text = {p: r["choices"][0]["text"] for p, r in solo.items()}
    aborts = metric(
        live_server,
        "keyserve:request_success_total",
        finished_reason="abort",
        model_name=MODEL_NAME,
    )

    async def run() -> list[str | None]:
        limits = httpx.Limits(max_connections=NUM_CLIENTS)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
            return await asyncio.gather(*(_client(i, http) for i in range(NUM_CLIENTS)))

    results = asyncio.run(run())
    for i, text in enumerate(results):
        if _leaves(i):
            assert text is None
        else:
            assert text == solo_text[PROMPTS[i % len(PROMPTS)]], f"client {i}"

    wait_pool_whole(live_server)
    leavers = sum(_leaves(i) for i in range(NUM_CLIENTS))
    deadline = time.monotonic() + 10
    while True:  # the gauges are set by the engine thread once it has applied the aborts
        used = metric(live_server, "keyserve:kv_blocks_used", model_name=MODEL_NAME)
        aborted = (
            metric(
                live_server,
                "keyserve:request_success_total",
                finished_reason="abort",
                model_name=MODEL_NAME,
            )
            - aborts
        )
        if (used, aborted) == (0, leavers) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert used == 0
    assert aborted == leavers
    assert metric(live_server, "keyserve:num_requests_running", model_name=MODEL_NAME) == 0


def test_non_streaming_client_that_leaves_is_aborted(live_server):
    aborts = metric(
        live_server,
        "keyserve:request_success_total",
        finished_reason="abort",
        model_name=MODEL_NAME,
    )
    body = _body("Write a long story:", 400, stream=False)
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(f"{live_server.url}/v1/completions", json=body, timeout=1.0)
    wait_pool_whole(live_server)  # long before 400 tokens could have been generated
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        labels = {"finished_reason": "abort", "model_name": MODEL_NAME}
        if metric(live_server, "keyserve:request_success_total", **labels) == aborts + 1:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the abandoned request was not aborted")
