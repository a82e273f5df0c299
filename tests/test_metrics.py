"""/metrics: Prometheus text that parses, with every family present and moving."""

import httpx
from live_server import MODEL_NAME
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import ServerMetrics

FAMILIES = {
    "keyserve:num_requests_running": "gauge",
    "keyserve:num_requests_waiting": "gauge",
    "keyserve:kv_cache_usage_perc": "gauge",
    "keyserve:kv_blocks_used": "gauge",
    "keyserve:kv_blocks_total": "gauge",
    "keyserve:num_requests_running_peak": "gauge",
    "keyserve:kv_blocks_used_peak": "gauge",
    "keyserve:tokens_evicted": "counter",
    "keyserve:blocks_freed_by_eviction": "counter",
    "keyserve:num_preemptions": "counter",
    "keyserve:num_squeezes": "counter",
    "keyserve:tokens_evicted_by_squeeze": "counter",
    "keyserve:prompt_tokens": "counter",
    "keyserve:generation_tokens": "counter",
    "keyserve:request_success": "counter",
    "keyserve:time_to_first_token_seconds": "histogram",
    "keyserve:time_per_output_token_seconds": "histogram",
    "keyserve:e2e_request_latency_seconds": "histogram",
    "keyserve:request_queue_time_seconds": "histogram",
}


def scrape(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value}, after checking the families and their labels."""
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, kind in FAMILIES.items():
        assert families[name].type == kind, name
    samples = {}
    for family in families.values():
        for s in family.samples:
            assert s.labels["model_name"] == MODEL_NAME, s
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name: str, **labels) -> float:
    key = (name, tuple(sorted({"model_name": MODEL_NAME, **labels}.items())))
    return samples[key]


def test_engine_counters_advance_by_what_moved():
    m = ServerMetrics(MODEL_NAME)
    stats = {
        "running": 2,
        "waiting": 1,
        "kv_blocks_used": 3,
        "kv_blocks_total": 12,
        "peak_running": 2,
        "peak_kv_blocks_used": 5,
        "preemptions": 1,
        "tokens_evicted": 40,
        "blocks_freed_by_eviction": 2,
        "squeezes": 3,
        "tokens_evicted_by_squeeze": 12,
    }
    m.record_engine_stats(stats)
    m.record_engine_stats({**stats, "tokens_evicted": 50, "squeezes": 4, "kv_blocks_used": 0})
    samples = scrape(m.render()[0].decode())
    assert value(samples, "keyserve:tokens_evicted_total") == 50
    assert value(samples, "keyserve:num_preemptions_total") == 1
    assert value(samples, "keyserve:num_squeezes_total") == 4
    assert value(samples, "keyserve:tokens_evicted_by_squeeze_total") == 12
    assert value(samples, "keyserve:kv_blocks_used") == 0
    assert value(samples, "keyserve:kv_cache_usage_perc") == 0
    assert value(samples, "keyserve:num_requests_waiting") == 1
    assert value(samples, "keyserve:kv_blocks_used_peak") == 5


def test_live_metrics_move(live_server):
    url = live_server.url
    before = scrape(httpx.get(f"{url}/metrics").text)
    body = {"prompt": "Tell me about the moon.", "max_tokens": 5, "temperature": 0}
    out = httpx.post(f"{url}/v1/completions", json={**body, "ignore_eos": True}).json()
    response = httpx.get(f"{url}/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    after = scrape(response.text)

    def moved(name: str, **labels) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("keyserve:prompt_tokens_total") == out["usage"]["prompt_tokens"]
    assert moved("keyserve:generation_tokens_total") == 5
    assert moved("keyserve:request_success_total", finished_reason="length") == 1
    for histogram in (
        "keyserve:time_to_first_token_seconds",
        "keyserve:time_per_output_token_seconds",
        "keyserve:e2e_request_latency_seconds",
        "keyserve:request_queue_time_seconds",
    ):
        assert moved(f"{histogram}_count") == 1, histogram
    assert value(after, "keyserve:kv_blocks_total") == live_server.engine.kv.num_total_blocks
    assert 0 <= value(after, "keyserve:kv_cache_usage_perc") <= 1
    # The request held blocks and ran, so the high-water marks saw it.
    assert value(after, "keyserve:kv_blocks_used_peak") >= 1
    assert value(after, "keyserve:num_requests_running_peak") >= 1
