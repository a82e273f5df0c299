"""The server's own view of the load, from its Prometheus /metrics page.

Polled gauges miss short peaks (a 0.5 s poll sees the batch at that instant),
so keyserve's high-water marks, read at the end, are preferred when present.
"""

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

METRICS_PATH = "/metrics"
# Each server's running-batch size, first match wins.
RUNNING = ("keyserve:num_requests_running", "vllm:num_requests_running")
# KV usage as a fraction; vLLM renamed gpu_cache_usage_perc to kv_cache_usage_perc.
KV_USAGE = ("keyserve:kv_cache_usage_perc", "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
KEYSERVE_PEAK_RUNNING = "keyserve:num_requests_running_peak"
KEYSERVE_PEAK_BLOCKS = "keyserve:kv_blocks_used_peak"
KEYSERVE_BLOCKS_TOTAL = "keyserve:kv_blocks_total"
# Counters read as the run starts and ends: the run's own count is the rise
# (first match wins; vLLM has no squeezes).
COUNTERS = {
    "preemptions": ("keyserve:num_preemptions_total", "vllm:num_preemptions_total"),
    "squeezes": ("keyserve:num_squeezes_total",),
    "tokens_evicted_by_squeeze": ("keyserve:tokens_evicted_by_squeeze_total",),
}


def parse_metrics(text: str) -> dict[str, list[float]]:
    """Sample values by sample name (one per label set: vLLM labels per engine)."""
    samples: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample.value)
    return samples


def _first(samples: dict[str, list[float]], names: tuple[str, ...]) -> list[float] | None:
    return next((samples[n] for n in names if n in samples), None)


def running_of(samples: dict[str, list[float]]) -> float | None:
    values = _first(samples, RUNNING)
    return None if values is None else sum(values)  # requests add up over engines


def kv_usage_of(samples: dict[str, list[float]]) -> float | None:
    values = _first(samples, KV_USAGE)
    return None if values is None else max(values)  # the fullest pool is the limit


def _single(samples: dict[str, list[float]], name: str) -> float | None:
    values = samples.get(name)
    return None if not values else max(values)


@dataclass
class MetricsPoller:
    """Polls /metrics every `interval` s until stopped; keeps the maxima."""

    http: httpx.AsyncClient
    interval: float = 0.5
    timeout: float = 5.0
    polls: int = 0
    errors: int = 0
    missing: bool = False  # /metrics answered 404: stop asking
    peak_running: float | None = None
    peak_kv_usage: float | None = None

    async def fetch(self) -> dict[str, list[float]] | None:
        """One scrape, or None (counted) when it fails in any way."""
        if self.missing:
            return None
        try:
            r = await self.http.get(METRICS_PATH, timeout=self.timeout)
            if r.status_code == 404:
                self.missing = True
                return None
            r.raise_for_status()
            samples = parse_metrics(r.text)
        except (httpx.HTTPError, ValueError):
            self.errors += 1
            return None
        self.polls += 1
        self._update(samples)
        return samples

    def _update(self, samples: dict[str, list[float]]) -> None:
        self.peak_running = _max(self.peak_running, running_of(samples))
        self.peak_kv_usage = _max(self.peak_kv_usage, kv_usage_of(samples))

    async def poll_until(self, stop: asyncio.Event) -> None:
        while not stop.is_set() and not self.missing:
            await self.fetch()
            # Wakes at once when stopped, so the run's end is not delayed a period.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval)


def _max(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    return a if b is None else max(a, b)


def keyserve_peaks(samples: dict[str, list[float]] | None) -> dict[str, float | None]:
    """keyserve's exact high-water marks (since the server started)."""
    samples = samples or {}
    used = _single(samples, KEYSERVE_PEAK_BLOCKS)
    total = _single(samples, KEYSERVE_BLOCKS_TOTAL)
    return {
        "peak_running": _single(samples, KEYSERVE_PEAK_RUNNING),
        "peak_kv_blocks_used": used,
        "kv_blocks_total": total,
        "peak_kv_usage": used / total if used is not None and total else None,
    }


def counter_rises(
    start: dict[str, list[float]] | None, end: dict[str, list[float]] | None
) -> dict[str, float | None]:
    """Each COUNTERS entry's rise over the run; None where the server has no such counter."""
    rises: dict[str, float | None] = {}
    for key, names in COUNTERS.items():
        before, after = _first(start or {}, names), _first(end or {}, names)
        rises[key] = None if after is None else sum(after) - sum(before or [0.0])
    return rises


def server_summary(
    poller: MetricsPoller, start: dict[str, list[float]] | None, end: dict[str, list[float]] | None
) -> dict[str, Any]:
    """peak_running / peak_kv_usage: keyserve's exact peaks when they belong
    to this run, else the polled maxima; None when /metrics never answered."""
    exact_start, exact_end = keyserve_peaks(start), keyserve_peaks(end)
    running_key, kv_key = "peak_running", "peak_kv_blocks_used"
    own_running = _set_by_this_run(exact_start[running_key], exact_end[running_key])
    own_kv = _set_by_this_run(exact_start[kv_key], exact_end[kv_key])
    return {
        "peak_running": exact_end["peak_running"] if own_running else poller.peak_running,
        "peak_kv_usage": exact_end["peak_kv_usage"] if own_kv else poller.peak_kv_usage,
        "peak_source": {
            "running": "keyserve_peak" if own_running else "polled",
            "kv_usage": "keyserve_peak" if own_kv else "polled",
        },
        "polled_peak_running": poller.peak_running,
        "polled_peak_kv_usage": poller.peak_kv_usage,
        "keyserve_peaks": exact_end if exact_end["peak_running"] is not None else None,
        "keyserve_peaks_at_start": exact_start if exact_start["peak_running"] is not None else None,
        "counters": counter_rises(start, end),
        "metrics_polls": poller.polls,
        "metrics_errors": poller.errors,
        "metrics_missing": poller.missing,
    }


def _set_by_this_run(at_start: float | None, at_end: float | None) -> bool:
    """Whether a server-lifetime high-water mark read at the end is this run's
    peak: it is when it rose during the run, or was 0 before it. Unchanged and
    above 0 means an earlier load set it and this run stayed at or below it,
    so only the polled maximum describes this run."""
    if at_end is None:
        return False
    return at_start is None or at_start == 0 or at_end > at_start
