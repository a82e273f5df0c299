"""run_load: drive a server at fixed concurrency or Poisson arrivals, then summarize."""

import asyncio
import contextlib
import random
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

from bench.serve.client import RequestRecord, request_body, send_request
from bench.serve.prompts import default_tokenizer_dir, prompt_windows
from bench.serve.server_metrics import MetricsPoller, server_summary
from bench.serve.stats import summarize

Send = Callable[[int], Awaitable[None]]


async def run_load(
    url: str,
    model: str,
    *,
    prompt_tokens: int = 512,
    output_tokens: int = 128,
    num_requests: int = 64,
    concurrency: int | None = None,
    rate: float | None = None,
    extra_body: dict[str, Any] | None = None,
    full_share: float = 0.0,
    tokenizer: str | Path | None = None,
    seed: int = 0,
    name: str = "run",
    api_key: str | None = None,
    metrics_interval: float = 0.5,
    progress: bool = True,
) -> dict[str, Any]:
    """Send `num_requests` streamed completions to `url` and return every figure.

    Exactly one of `concurrency` (that many requests in flight, a new one as
    each finishes) or `rate` (Poisson arrivals, requests/s) must be given.
    Failed requests are counted by code in the result, never raised.
    """
    _check_mode(concurrency, rate)
    # Resolved here, so the report says which tokenizer cut the prompts.
    tokenizer_dir = str(default_tokenizer_dir() if tokenizer is None else tokenizer)
    settings = {
        "url": url,
        "model": model,
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "num_requests": num_requests,
        "concurrency": concurrency,
        "rate": rate,
        "extra_body": extra_body,
        "full_share": full_share,
        "tokenizer": tokenizer_dir,
        "seed": seed,
        "metrics_interval": metrics_interval,
    }
    # Tokenized before the clock starts: only the server is timed.
    prompts = prompt_windows(num_requests, prompt_tokens, seed, tokenizer_dir)
    records = [RequestRecord(i, len(p)) for i, p in enumerate(prompts)]
    bodies = [
        request_body(model, p, output_tokens, _extra_of(i, extra_body, full_share))
        for i, p in enumerate(prompts)
    ]
    async with _client(url, api_key) as http:
        poller = MetricsPoller(http, metrics_interval)
        start_samples = await poller.fetch()
        with _progress_bar(num_requests, name, progress) as bar:

            async def send(i: int) -> None:
                await send_request(http, bodies[i], records[i])
                bar.update(1)

            async with _polling(poller):
                await _dispatch(send, num_requests, concurrency, rate, seed)
        end_samples = await poller.fetch()
    return _result(name, settings, records, server_summary(poller, start_samples, end_samples))


def is_full(index: int, share: float) -> bool:
    """Whether request `index` of a mixed load keeps its whole cache: spread
    evenly, `share` of the requests (request i when floor((i+1) * share) steps up)."""
    return int((index + 1) * share) > int(index * share)


def _extra_of(index: int, extra: dict[str, Any] | None, full_share: float) -> dict[str, Any] | None:
    """A mixed load's full requests send kv_policy full over the extra body's."""
    if not is_full(index, full_share):
        return extra
    return {**(extra or {}), "kv_policy": "full"}


def _check_mode(concurrency: int | None, rate: float | None) -> None:
    if (concurrency is None) == (rate is None):
        raise ValueError("give exactly one of concurrency or rate")
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    if rate is not None and not rate > 0:
        raise ValueError(f"rate must be positive, got {rate}")


def _client(url: str, api_key: str | None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    return httpx.AsyncClient(
        base_url=url,
        headers=headers,
        # No read timeout: a long generation under load is data, not an error.
        timeout=httpx.Timeout(None, connect=30.0),
        # Poisson arrivals may put every request in flight at once; a pool
        # limit would queue them in the client and hide the server's queueing.
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
        # A proxy from the environment would sit between us and the server and
        # be measured with it.
        trust_env=False,
    )


@contextlib.asynccontextmanager
async def _polling(poller: MetricsPoller) -> AsyncIterator[None]:
    """Scrape /metrics in the background for as long as the block runs."""
    stop = asyncio.Event()
    task = asyncio.create_task(poller.poll_until(stop))
    try:
        yield
    finally:
        stop.set()
        await task


async def _dispatch(
    send: Send, num: int, concurrency: int | None, rate: float | None, seed: int
) -> None:
    if concurrency is not None:
        await _at_concurrency(send, num, concurrency)
    else:
        assert rate is not None  # _check_mode
        await _poisson(send, num, rate, seed)


async def _at_concurrency(send: Send, num: int, concurrency: int) -> None:
    gate = asyncio.Semaphore(concurrency)

    async def gated(i: int) -> None:
        async with gate:
            await send(i)

    await asyncio.gather(*(gated(i) for i in range(num)))


def arrival_offsets(num: int, rate: float, seed: int) -> list[float]:
    """Seconds after the start at which each request is sent: the first at 0,
    then exponential gaps of mean 1/rate (a Poisson process), seeded."""
    rng = random.Random(f"arrivals:{seed}")
    offsets, at = [], 0.0
    for _ in range(num):
        offsets.append(at)
        at += rng.expovariate(rate)
    return offsets


async def _poisson(send: Send, num: int, rate: float, seed: int) -> None:
    start = time.perf_counter()
    tasks = []
    for i, offset in enumerate(arrival_offsets(num, rate, seed)):
        # Sleep to an absolute time so the event loop's lateness does not add up.
        delay = start + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(send(i)))
    await asyncio.gather(*tasks)


def _progress_bar(total: int, label: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=label,
        unit="req",
        file=sys.stderr,
        dynamic_ncols=True,
        disable=not enabled,
    )


def _result(
    name: str,
    settings: dict[str, Any],
    records: Sequence[RequestRecord],
    server: dict[str, Any],
) -> dict[str, Any]:
    return {
        "label": name,
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": settings,
        **summarize(records),
        "peak_running": server["peak_running"],
        "peak_kv_usage": server["peak_kv_usage"],
        "preemptions": server["counters"]["preemptions"],
        "squeezes": server["counters"]["squeezes"],
        "server_metrics": server,
        "requests": [r.summary() for r in records],
    }
