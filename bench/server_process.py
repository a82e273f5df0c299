"""A server under test as a child process: start it, wait until /health
answers, stop it with SIGTERM (its graceful drain). Used by the soak
(bench/soak.py) and the peer comparison (bench/peer/compare.py)."""

import os
import socket
import subprocess
import sys
import time
from typing import IO

import httpx


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def keyserve_command(port: int, *flags: str) -> list[str]:
    """`keyserve serve` on loopback `port`, from this interpreter (this checkout)."""
    return [sys.executable, "-m", "server.cli", "serve", "--port", str(port), *flags]


def start_server(
    command: list[str],
    url: str,
    *,
    env: dict[str, str] | None = None,
    log: IO | None = None,
    timeout: float = 600,
    label: str = "the server",
) -> subprocess.Popen:
    """Run `command` and return once GET url/health is 200; raises (and kills
    it) if it exits first or does not answer within `timeout` seconds."""
    proc = subprocess.Popen(command, env={**os.environ, **(env or {})}, stdout=log, stderr=log)
    where = f"; see {log.name}" if log is not None else ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{label} exited with {proc.returncode}{where}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{label} did not answer /health within {timeout:.0f} s{where}")


def stop_server(proc: subprocess.Popen | None, timeout: float = 60) -> None:
    """SIGTERM (the server drains), then SIGKILL if it is still there after `timeout`."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
