"""Releasing a thread's OpenMP workers (engine/host/openmp.py), which the server
does on its event-loop thread before the engine thread starts stepping."""

import asyncio
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from server.async_engine import AsyncEngine

CHILD = textwrap.dedent(
    """
    import os, time, torch
    from engine.host.openmp import release_thread_pool
    count = lambda: len(os.listdir("/proc/self/task"))
    torch.set_num_threads(2)
    before = count()
    torch.randn(10**7).exp_()  # a parallel region: this thread gets workers
    with_pool = count()
    released = release_thread_pool()
    time.sleep(0.2)  # the workers exit on their own
    print(before, with_pool, released, count())
    """
)


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs Linux /proc")
def test_release_ends_the_threads_workers():
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    out = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    before, with_pool, released, after = out.stdout.split()
    assert int(with_pool) == int(before) + 1  # one worker beside this thread
    assert released == "True"
    assert int(after) == int(before)


def test_the_server_readies_the_host_before_its_engine_thread_starts(monkeypatch):
    """It releases its loop thread's workers, and has malloc keep freed memory
    (engine/host/malloc.py), before the engine thread makes its first step."""
    calls = []
    monkeypatch.setattr("server.async_engine.release_thread_pool", lambda: calls.append("omp"))
    monkeypatch.setattr(
        "server.async_engine.keep_freed_host_memory", lambda: calls.append("malloc")
    )

    class Idle:
        def has_unfinished_requests(self) -> bool:
            return False

    async def start_and_stop():
        engine = AsyncEngine(Idle())
        await engine.start()
        await engine.shutdown()

    asyncio.run(start_and_stop())
    assert calls == ["omp", "malloc"]
