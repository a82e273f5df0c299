"""Prometheus metrics, named as vLLM names them but with a `keyserve:` prefix.

A private CollectorRegistry: two servers in one process (the tests) must not
collide in the global one, and /metrics shows only what this server owns.
Every series carries `model_name`, as vLLM's do, so dashboards can be shared.
"""

from collections.abc import Mapping

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from engine import KVUsage

# vLLM's buckets, so its Grafana panels read ours unchanged.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
TPOT_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
    40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
# Budgets chosen from kv_target_mass, as a fraction of the prompt.
KEPT_FRACTION_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)

# Engine counters (LLMEngine.stats() keys, cumulative) -> our counter names.
_ENGINE_COUNTERS = {
    "tokens_evicted": ("keyserve:tokens_evicted", "KV tokens evicted by the KV policy."),
    "blocks_freed_by_eviction": (
        "keyserve:blocks_freed_by_eviction",
        "KV blocks returned to the pool by eviction.",
    ),
    "preemptions": ("keyserve:num_preemptions", "Requests preempted for lack of KV blocks."),
    "squeezes": (
        "keyserve:num_squeezes",
        "Budget cuts of running sequences for lack of KV blocks (kv_pressure squeeze).",
    ),
    "tokens_evicted_by_squeeze": (
        "keyserve:tokens_evicted_by_squeeze",
        "KV tokens evicted by squeezes (also counted in tokens_evicted).",
    ),
}


class ServerMetrics:
    """All of the server's series. Thread-safe (prometheus_client locks): the
    engine thread records, the event loop renders."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        # In this order, so /metrics lists the series as it always has.
        self._add_load_gauges()
        self._add_engine_counters()
        self._add_token_counters()
        self._add_latency_histograms()
        self._add_request_outcomes()
        self._add_kv_budget_histogram()

    def _gauge(self, name: str, doc: str) -> Gauge:
        return Gauge(name, doc, ["model_name"], registry=self.registry).labels(self.model_name)

    def _counter(self, name: str, doc: str) -> Counter:
        return Counter(name, doc, ["model_name"], registry=self.registry).labels(self.model_name)

    def _histogram(self, name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
        family = Histogram(name, doc, ["model_name"], buckets=buckets, registry=self.registry)
        return family.labels(self.model_name)

    def _add_load_gauges(self) -> None:
        """The batch, the queue and the KV pool, as of the last engine step."""
        self.running = self._gauge(
            "keyserve:num_requests_running", "Requests in the running batch."
        )
        self.waiting = self._gauge(
            "keyserve:num_requests_waiting", "Requests waiting to be admitted."
        )
        self.kv_usage = self._gauge(
            "keyserve:kv_cache_usage_perc", "Fraction of KV blocks in use (1 = full)."
        )
        self.kv_used = self._gauge("keyserve:kv_blocks_used", "KV blocks in use.")
        self.kv_total = self._gauge("keyserve:kv_blocks_total", "KV blocks in the pool.")
        self.peak_running = self._gauge(
            "keyserve:num_requests_running_peak", "Most requests ever in one running batch."
        )
        self.peak_kv_used = self._gauge(
            "keyserve:kv_blocks_used_peak", "Most KV blocks ever in use at once."
        )

    def _add_engine_counters(self) -> None:
        """Counters mirrored from the engine's cumulative stats (see record_engine_stats)."""
        self.engine_counters = {
            key: self._counter(name, doc) for key, (name, doc) in _ENGINE_COUNTERS.items()
        }
        # What the engine had counted at the last record, so only the rise is added.
        self._engine_seen = dict.fromkeys(_ENGINE_COUNTERS, 0)

    def _add_token_counters(self) -> None:
        self.prompt_tokens = self._counter("keyserve:prompt_tokens", "Prefilled prompt tokens.")
        self.generation_tokens = self._counter("keyserve:generation_tokens", "Generated tokens.")

    def _add_latency_histograms(self) -> None:
        self.ttft = self._histogram(
            "keyserve:time_to_first_token_seconds",
            "Arrival to first generated token.",
            TTFT_BUCKETS,
        )
        self.tpot = self._histogram(
            "keyserve:time_per_output_token_seconds",
            "Mean time between a request's output tokens, after the first.",
            TPOT_BUCKETS,
        )
        self.e2e = self._histogram(
            "keyserve:e2e_request_latency_seconds", "Arrival to finish.", LATENCY_BUCKETS
        )
        self.queue_time = self._histogram(
            "keyserve:request_queue_time_seconds",
            "Arrival to the start of the step that produced the first token.",
            LATENCY_BUCKETS,
        )

    def _add_request_outcomes(self) -> None:
        # Labelled by reason too, so not through _counter.
        self._success = Counter(
            "keyserve:request_success",
            "Finished requests by finish reason.",
            ["model_name", "finished_reason"],
            registry=self.registry,
        )
        for reason in ("stop", "length", "abort"):
            self._success.labels(self.model_name, reason)  # present at 0 from the start

    def _add_kv_budget_histogram(self) -> None:
        self.kv_target_mass_budget = self._histogram(
            "keyserve:kv_target_mass_budget_fraction",
            "Budget chosen from kv_target_mass at the end of a prompt, as a fraction of "
            "the prompt (budget tokens / prompt tokens, at most 1).",
            KEPT_FRACTION_BUCKETS,
        )

    def record_kv_budget(self, kv: KVUsage | None, prompt_tokens: int) -> None:
        """A finished sequence's budget, where kv_target_mass chose it."""
        if kv is None or kv.target_mass is None or kv.budget is None or prompt_tokens <= 0:
            return
        self.kv_target_mass_budget.observe(min(1.0, kv.budget / prompt_tokens))

    def record_engine_stats(self, stats: Mapping[str, int]) -> None:
        """Set gauges from LLMEngine.stats(); advance counters by what moved since last time."""
        self.running.set(stats["running"])
        self.waiting.set(stats["waiting"])
        used, total = stats["kv_blocks_used"], stats["kv_blocks_total"]
        self.kv_used.set(used)
        self.kv_total.set(total)
        self.kv_usage.set(used / total if total else 0.0)
        self.peak_running.set(stats["peak_running"])
        self.peak_kv_used.set(stats["peak_kv_blocks_used"])
        for key, series in self.engine_counters.items():
            delta = stats[key] - self._engine_seen[key]
            if delta > 0:
                series.inc(delta)
                self._engine_seen[key] = stats[key]

    def record_first_token(self, ttft: float, queue_time: float, prompt_tokens: int) -> None:
        self.ttft.observe(ttft)
        self.queue_time.observe(queue_time)
        self.prompt_tokens.inc(prompt_tokens)

    def record_finished(
        self, reason: str, e2e: float, decode_time: float, num_output_tokens: int
    ) -> None:
        self._success.labels(self.model_name, reason).inc()
        self.e2e.observe(e2e)
        if num_output_tokens > 1:
            self.tpot.observe(decode_time / (num_output_tokens - 1))

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
