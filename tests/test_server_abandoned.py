"""Clients that give up: a request whose connection is gone is aborted at
once, streamed or not, even while it still waits for the engine to take it,
so a burst of abandoned requests does not hold up the next client."""

import json
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from live_server import MODEL_NAME, metric, wait_pool_whole

BLOCKER = [7, 7, 7, 7]  # token ids whose first token the hook below holds for a while
PROBE = [8, 8, 8, 8]
STALL_S = 2.0  # much longer than the probe's client waits


@pytest.fixture(autouse=True)
def _pool_is_whole_after(live_server):
    yield
    live_server.engine.fault_hook = None
    wait_pool_whole(live_server)
    _wait_no_groups(live_server)


def _wait_no_groups(server, timeout: float = 10.0) -> None:
    """Poll until the server tracks no API call (the event loop drops a group
    once its last output, an abort included, has reached it)."""
    deadline = time.monotonic() + timeout
    while server.app.state.engine.num_unfinished_groups and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.app.state.engine.num_unfinished_groups == 0


def _aborts(server) -> float:
    labels = {"finished_reason": "abort", "model_name": MODEL_NAME}
    return metric(server, "keyserve:request_success_total", **labels)


class _StallingHook:
    """An engine fault hook (run on the engine thread, inside the step) that
    records every prompt that got a token and holds the step that gives
    BLOCKER its first token for STALL_S: meanwhile new requests queue as
    commands the engine thread will only read after the step."""

    def __init__(self) -> None:
        self.stalled = threading.Event()
        self.scheduled: set[tuple[int, ...]] = set()

    def __call__(self, request) -> None:
        self.scheduled.add(tuple(request.prompt_token_ids))
        if request.prompt_token_ids == BLOCKER and not self.stalled.is_set():
            self.stalled.set()
            time.sleep(STALL_S)


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_abandoned_before_the_engine_took_it_is_never_run(live_server, stream):
    hook = _StallingHook()
    live_server.engine.fault_hook = hook
    aborts = _aborts(live_server)
    blocker_body = {"prompt": BLOCKER, "max_tokens": 2, "ignore_eos": True}
    blocker = threading.Thread(
        target=httpx.post,
        args=(f"{live_server.url}/v1/completions",),
        kwargs={"json": blocker_body, "timeout": 60},
    )
    blocker.start()
    assert hook.stalled.wait(30)
    client = openai.OpenAI(
        base_url=f"{live_server.url}/v1", api_key="unused", timeout=0.5, max_retries=0
    )
    # The engine is stuck in its step, so the server cannot even queue the
    # probe before the client gives up and closes the connection.
    with pytest.raises(openai.APITimeoutError):
        client.completions.create(model=MODEL_NAME, prompt=PROBE, max_tokens=4, stream=stream)
    blocker.join(60)
    wait_pool_whole(live_server)
    # The abort reached the engine thread with the add, before any step.
    assert tuple(PROBE) not in hook.scheduled
    assert tuple(BLOCKER) in hook.scheduled
    assert _aborts(live_server) == aborts + 1


BURST = 200
# The burst comes from another process, as real clients do: BURST chat
# requests for 1000 tokens each from a client that gives up after 0.5 s, and
# the SDK's two retries of each. It prints what each call raised.
BURST_CLIENT = """
import asyncio, json, sys
import openai

async def one(client, i):
    try:
        await client.chat.completions.create(
            model=sys.argv[2],
            messages=[{"role": "user", "content": f"Tell me a long story, number {i}."}],
            max_tokens=1000,
            extra_body={"ignore_eos": True},  # surely not done within 0.5 s
        )
    except openai.APIError as e:
        return type(e).__name__
    return "finished"

async def main():
    client = openai.AsyncOpenAI(
        base_url=sys.argv[1] + "/v1", api_key="unused", timeout=0.5, max_retries=2
    )
    async with client:
        return await asyncio.gather(*(one(client, i) for i in range(int(sys.argv[3]))))

print(json.dumps(asyncio.run(main())))
"""


def test_an_abandoned_burst_does_not_hold_up_the_next_request(live_server):
    start = time.monotonic()
    burst = subprocess.run(
        [sys.executable, "-c", BURST_CLIENT, live_server.url, MODEL_NAME, str(BURST)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert burst.returncode == 0, burst.stderr
    assert set(json.loads(burst.stdout)) == {"APITimeoutError"}
    client = openai.OpenAI(
        base_url=f"{live_server.url}/v1", api_key="unused", timeout=5.0, max_retries=0
    )
    after_burst = time.monotonic()
    out = client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "Name a fruit."}],
        max_tokens=8,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert out.usage.completion_tokens == 8  # within the client's 5 s
    took = time.monotonic() - after_burst
    print(f"burst {after_burst - start:.1f} s, then one request {took:.2f} s")
    # Nothing of the burst lingers: no request, group or block.
    wait_pool_whole(live_server)
    _wait_no_groups(live_server)
