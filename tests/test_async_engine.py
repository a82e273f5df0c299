"""AsyncEngine against a scripted fake engine (no model): all-or-none adds,
aborts, queue limits, shutdown, and a dying engine loop seen over HTTP."""

import asyncio
import time

import httpx
import pytest

from engine import CompletionOutput, RequestOutput, SamplingParams
from server import ServerSettings, build_app
from server.async_engine import AsyncEngine
from server.errors import EngineDeadError, QueueFullError

POISON = [0]  # a prompt the fake refuses, as the engine refuses bad input


class FakeEngine:
    """Emits token 7 once per step for every live request; can be told to crash."""

    max_model_len = 64
    tokenizer = None

    def __init__(self, crash_at_step: int | None = None) -> None:
        self.live: dict[str, dict] = {}
        self.steps = 0
        self.crash_at_step = crash_at_step

    def add_request(self, rid: str, prompt: list[int], params: SamplingParams) -> None:
        if prompt == POISON:
            raise ValueError("prompt contains a poisoned token")
        self.live[rid] = {"prompt": list(prompt), "out": [], "max": params.max_tokens}

    def abort_request(self, rid: str) -> RequestOutput | None:
        r = self.live.pop(rid, None)
        return None if r is None else self._output(rid, r, "abort")

    def has_unfinished_requests(self) -> bool:
        return bool(self.live)

    def step(self) -> list[RequestOutput]:
        self.steps += 1
        if self.crash_at_step is not None and self.steps >= self.crash_at_step:
            raise RuntimeError("simulated engine crash")
        time.sleep(0.002)
        outputs = []
        for rid, r in list(self.live.items()):
            r["out"].append(7)
            done = len(r["out"]) >= r["max"]
            if done:
                del self.live[rid]
            outputs.append(self._output(rid, r, "length" if done else None))
        return outputs

    def stats(self) -> dict:
        return {
            "running": len(self.live),
            "waiting": 0,
            "kv_blocks_used": len(self.live),
            "kv_blocks_total": 8,
            "peak_running": len(self.live),
            "peak_kv_blocks_used": len(self.live),
            "preemptions": 0,
            "tokens_evicted": 0,
            "blocks_freed_by_eviction": 0,
        }

    @staticmethod
    def _output(rid: str, r: dict, reason: str | None) -> RequestOutput:
        out = list(r["out"])
        completion = CompletionOutput(0, "x" * len(out), out, finish_reason=reason)
        return RequestOutput(rid, None, r["prompt"], [completion], finished=reason is not None)


def _params(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens)


def run(coro_fn, engine: FakeEngine, **kwargs):
    async def main():
        async_engine = AsyncEngine(engine, **kwargs)
        await async_engine.start()
        try:
            return await coro_fn(async_engine)
        finally:
            await async_engine.shutdown()

    return asyncio.run(asyncio.wait_for(main(), 30))


def test_group_streams_to_the_end():
    async def body(ae):
        group = await ae.add([("a", [1], _params(3)), ("b", [2], _params(5))])
        seen = []
        async for updates in group.updates():
            seen.extend(i for i, _ in updates)
        final = group.latest
        assert [len(o.outputs[0].token_ids) for o in final] == [3, 5]
        assert [o.outputs[0].finish_reason for o in final] == ["length", "length"]
        assert set(seen) == {0, 1}
        assert ae.num_unfinished_groups == 0

    run(body, FakeEngine())


def test_add_is_all_or_none():
    fake = FakeEngine()

    async def body(ae):
        with pytest.raises(ValueError, match="poisoned"):
            await ae.add([("a", [1], _params(1000)), ("b", POISON, _params(1000))])
        assert ae.num_unfinished_groups == 0

    run(body, fake)
    assert fake.live == {}


def test_abort_finishes_the_group_and_frees_the_engine():
    fake = FakeEngine()

    async def body(ae):
        group = await ae.add([("a", [1], _params(10**6))])
        async for _ in group.updates():
            group.abort()
            group.abort()  # twice is harmless
        assert group.latest[0].outputs[0].finish_reason == "abort"
        assert ae.num_unfinished_groups == 0

    run(body, fake)
    assert fake.live == {}


def test_queue_limit():
    async def body(ae):
        with pytest.raises(QueueFullError):
            await ae.add([("a", [1], _params(2)), ("b", [2], _params(2))])

    run(body, FakeEngine(), max_waiting=1)


def test_shutdown_aborts_what_runs():
    fake = FakeEngine()

    async def body(ae):
        group = await ae.add([("a", [1], _params(10**6))])
        await ae.shutdown()
        await asyncio.wait_for(group.final(), 5)
        assert group.latest[0].outputs[0].finish_reason == "abort"
        with pytest.raises(EngineDeadError):
            await ae.add([("b", [1], _params(1))])

    run(body, fake)
    assert fake.live == {}


def test_a_dead_engine_loop_is_reported():
    async def body(ae):
        group = await ae.add([("a", [1], _params(10**6))])
        with pytest.raises(EngineDeadError, match="simulated engine crash"):
            await group.final()
        assert not ae.healthy
        with pytest.raises(EngineDeadError):
            await ae.add([("b", [1], _params(1))])

    run(body, FakeEngine(crash_at_step=3))


def test_a_dead_engine_over_http():
    async def main():
        ae = AsyncEngine(FakeEngine(crash_at_step=3))
        app = build_app(ae, ServerSettings("fake"), tokenizer=None)
        await ae.start()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            body = {"prompt": [1, 2], "max_tokens": 1000, "stream": True}
            stream = await c.post("/v1/completions", json=body)
            events = [e for e in stream.text.split("\n\n") if e]
            assert '"error"' in events[-2] and "engine_dead" in events[-2]
            assert events[-1] == "data: [DONE]"
            health = await c.get("/health")
            assert health.status_code == 503
            assert health.json()["error"]["code"] == "engine_dead"
            late = await c.post("/v1/completions", json={"prompt": [1], "max_tokens": 2})
            assert late.status_code == 500
            assert late.json()["error"]["code"] == "engine_dead"
        await ae.shutdown()

    asyncio.run(asyncio.wait_for(main(), 30))
