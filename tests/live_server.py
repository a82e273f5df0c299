"""A real uvicorn server on a loopback port, run in a thread of the test process."""

import socket
import threading
import time

import httpx
import uvicorn
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families


class LiveServer:
    """`with LiveServer(app) as s:` serves `app` at `s.url` until the block ends."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        # Bind first and hand uvicorn the socket: no race for a "free" port.
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        self.sock.close()


MODEL_NAME = "smollm2-test"


def smollm2_engine():
    """The embedded SmolLM2 with a small KV pool (64 MiB: about 1400 tokens).
    Requests keep every token unless they set a KV policy (the server tests
    compare outputs token for token). float32 whatever `auto` picks here: the
    pool's token count is float32's, and greedy tokens do not flip with the
    batch a request lands in (bfloat16's rounding can flip near-ties)."""
    from engine import EngineConfig, LLMEngine

    return LLMEngine(EngineConfig(kv_cache_bytes="64MiB", kv_policy="full", dtype="float32"))


def wait_pool_whole(server, timeout=10.0):
    """Poll until every request is gone and the KV pool is empty (aborts land between steps)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.engine.kv.num_used_blocks == 0 and not server.engine.has_unfinished_requests():
            return
        time.sleep(0.05)
    raise AssertionError(f"{server.engine.kv.num_used_blocks} KV blocks still held")


def metric(server, name, **labels):
    text = httpx.get(f"{server.url}/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise KeyError(name)
