"""Injected faults: one request failing inside the engine fails alone; a dying
engine loop takes the process down (non-zero) so an orchestrator restarts it;
a full queue says when to retry."""

import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from live_server import wait_pool_whole
from test_server_errors import assert_error

ROOT = Path(__file__).resolve().parents[1]
POISON = [6, 6, 6, 6]  # a prompt (token ids) the fault hook fails after two tokens
PROMPTS = ["The capital of France is", "Count: 1, 2, 3,", "The sea is"]


@pytest.fixture(autouse=True)
def _pool_is_whole_after(live_server):
    yield
    live_server.engine.fault_hook = None
    wait_pool_whole(live_server)


def _poison_hook(request) -> None:
    # Runs on the engine thread, inside the step, for every request that got a token.
    if request.prompt_token_ids == POISON and len(request.output_token_ids) >= 2:
        raise RuntimeError("injected fault")


def _body(prompt, stream: bool, n: int = 1) -> dict:
    return {
        "prompt": prompt,
        "max_tokens": 8,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
        "n": n,
    }


async def _stream_events(http: httpx.AsyncClient, body: dict) -> list[str]:
    async with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        return [line async for line in r.aiter_lines() if line]


def test_one_failing_request_fails_alone(live_server):
    url = live_server.url
    solo = {
        p: httpx.post(f"{url}/v1/completions", json=_body(p, False), timeout=120).json()
        for p in PROMPTS
    }
    live_server.engine.fault_hook = _poison_hook

    async def run():
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            good = [http.post("/v1/completions", json=_body(p, False)) for p in PROMPTS]
            bad = http.post("/v1/completions", json=_body(POISON, False))
            bad_n = http.post("/v1/completions", json=_body(POISON, False, n=2))
            bad_stream = _stream_events(http, _body(POISON, True))
            good_stream = _stream_events(http, _body(PROMPTS[0], True))
            return await asyncio.gather(*good, bad, bad_n, bad_stream, good_stream)

    *good, bad, bad_n, bad_stream, good_stream = asyncio.run(run())
    for p, r in zip(PROMPTS, good, strict=True):
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == solo[p]["choices"][0]["text"]
    # vLLM answers a request that failed in the engine with a 500.
    for r in (bad, bad_n):
        error = assert_error(r, 500, code="internal_error")
        assert error["type"] == "server_error"
        assert "injected" not in error["message"]  # internals stay in the log
    # A stream: what was generated, then an error event, then [DONE].
    assert bad_stream[-1] == "data: [DONE]"
    error = json.loads(bad_stream[-2].removeprefix("data: "))["error"]
    assert error["code"] == "internal_error" and error["type"] == "server_error"
    assert good_stream[-1] == "data: [DONE]"
    text = "".join(
        json.loads(e.removeprefix("data: "))["choices"][0]["text"] for e in good_stream[:-1]
    )
    assert text == solo[PROMPTS[0]]["choices"][0]["text"]

    wait_pool_whole(live_server)
    assert live_server.app.state.engine.healthy
    live_server.engine.fault_hook = None
    again = httpx.post(f"{url}/v1/completions", json=_body(POISON, False), timeout=120)
    assert again.status_code == 200


def test_a_full_queue_is_503_with_retry_after(live_server):
    engine = live_server.app.state.engine
    engine.max_waiting = 0  # read by the engine thread at each add
    try:
        r = httpx.post(f"{live_server.url}/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert_error(r, 503, code="queue_full")
        assert int(r.headers["retry-after"]) >= 1
    finally:
        engine.max_waiting = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The forward pass raises for one marked prompt: the engine loop dies.
CRASHING_SERVE = """
import sys
from engine.runtime.model_runner import ModelRunner
from server.cli import main

execute = ModelRunner.execute

def crashing(self, chunks, *args, **kwargs):
    if any(c.request.prompt_token_ids == [6, 6, 6, 6] for c in chunks):
        raise RuntimeError("injected forward-pass failure")
    return execute(self, chunks, *args, **kwargs)

ModelRunner.execute = crashing
sys.exit(main(sys.argv[1:]))
"""


def _start(argv_prefix: list[str], port: int) -> subprocess.Popen:
    cmd = argv_prefix + ["serve", "--port", str(port), "--kv-cache-bytes", "64MiB"]
    cmd += ["--log-level", "warning"]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait_healthy(proc: subprocess.Popen, url: str) -> None:
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, proc.stdout.read().decode()
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not come up"
        time.sleep(0.2)


def test_a_dead_engine_loop_exits_non_zero_and_a_restart_serves():
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start([sys.executable, "-c", CRASHING_SERVE], port)
    try:
        _wait_healthy(proc, url)
        ok = httpx.post(f"{url}/v1/completions", json=_body("Hi", False), timeout=120)
        assert ok.status_code == 200
        r = httpx.post(f"{url}/v1/completions", json=_body(POISON, False), timeout=120)
        assert_error(r, 500, code="engine_dead")
        # /health is 503 for as long as the process lives; then it exits non-zero.
        try:
            health = httpx.get(f"{url}/health", timeout=5)
            assert health.status_code == 503
        except httpx.TransportError:
            pass  # already gone
        assert proc.wait(60) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()

    # The orchestrator starts it again: it serves at once.
    proc = _start([sys.executable, "-m", "server.cli"], port)
    try:
        _wait_healthy(proc, url)
        r = httpx.post(f"{url}/v1/completions", json=_body(POISON, False), timeout=120)
        assert r.status_code == 200, r.text
    finally:
        proc.terminate()
        proc.wait(60)
        proc.stdout.close()
