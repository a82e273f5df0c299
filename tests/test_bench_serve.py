"""The serving load generator (bench/serve/) against the test server: exact
token counts, ordered latency percentiles, the server's peaks, Poisson pacing,
failures counted by code, and the markdown/JSON it writes."""

import asyncio
import json

import pytest
from live_server import MODEL_NAME, wait_pool_whole

from bench.serve import arrival_offsets, render_table, run_load, write_results
from bench.serve.prompts import prompt_windows

PROMPT_TOKENS, OUTPUT_TOKENS, NUM, CONCURRENCY = 32, 4, 6, 3


def _load(server, **options) -> dict:
    # A short poll period: the whole run lasts about a second here.
    options = {"progress": False, "metrics_interval": 0.05, **options}
    return asyncio.run(run_load(server.url, MODEL_NAME, **options))


@pytest.fixture(scope="module")
def fixed_run(live_server) -> dict:
    wait_pool_whole(live_server)  # whatever ran before has left
    return _load(
        live_server,
        prompt_tokens=PROMPT_TOKENS,
        output_tokens=OUTPUT_TOKENS,
        num_requests=NUM,
        concurrency=CONCURRENCY,
        name="fixed",
    )


def _assert_percentiles(dist: dict) -> None:
    assert all(v is not None and v > 0 for v in dist.values()), dist
    assert dist["p50"] <= dist["p90"] <= dist["p99"], dist


def test_fixed_concurrency(live_server, fixed_run):
    r = fixed_run
    assert (r["completed"], r["failed"], r["failed_by_code"]) == (NUM, 0, {})
    # ignore_eos + max_tokens: exactly OUTPUT_TOKENS each; the token-id prompt taken as is.
    assert [q["completion_tokens"] for q in r["requests"]] == [OUTPUT_TOKENS] * NUM
    assert [q["prompt_tokens"] for q in r["requests"]] == [PROMPT_TOKENS] * NUM
    assert r["total_output_tokens"] == NUM * OUTPUT_TOKENS
    assert r["total_prompt_tokens"] == NUM * PROMPT_TOKENS
    assert r["duration_s"] > 0 and r["request_throughput"] == pytest.approx(NUM / r["duration_s"])
    assert r["output_throughput"] == pytest.approx(NUM * OUTPUT_TOKENS / r["duration_s"])
    for key in ("ttft_ms", "tpot_ms", "itl_ms"):
        _assert_percentiles(r[key])
    # keyserve's exact high-water mark counts from server start. This file sorts
    # before the other live-server tests, so it is 0 before this run and the
    # reported peak is the gauge's; after another load the report falls back
    # to the polled maximum, which must obey the same bounds.
    server = r["server_metrics"]
    if server["keyserve_peaks_at_start"]["peak_running"] == 0:
        assert server["peak_source"] == {"running": "keyserve_peak", "kv_usage": "keyserve_peak"}
        assert r["peak_running"] == server["keyserve_peaks"]["peak_running"]
    assert 1 <= r["peak_running"] <= CONCURRENCY
    assert 0 < r["peak_kv_usage"] <= 1
    assert server["metrics_polls"] >= 2 and server["metrics_errors"] == 0
    assert server["polled_peak_running"] <= CONCURRENCY
    # The counters' rise over the run, and the usage's KV details per request.
    assert (r["preemptions"], r["squeezes"], r["squeezed_requests"]) == (0, 0, 0)
    assert server["counters"]["tokens_evicted_by_squeeze"] == 0
    assert [q["kv_squeezed"] for q in r["requests"]] == [False] * NUM
    wait_pool_whole(live_server)
    assert live_server.engine.kv.num_used_blocks == 0


def test_poisson_arrivals(live_server):
    rate, num = 40.0, 4
    r = _load(live_server, prompt_tokens=16, output_tokens=3, num_requests=num, rate=rate, seed=3)
    assert (r["completed"], r["failed"], r["total_output_tokens"]) == (num, 0, num * 3)
    # The last request left at its scheduled offset, so the run lasts at least that long.
    assert r["duration_s"] >= arrival_offsets(num, rate, 3)[-1]
    wait_pool_whole(live_server)


def test_schedule_and_prompts_are_seeded():
    offsets = arrival_offsets(2000, 10.0, seed=0)
    assert offsets == arrival_offsets(2000, 10.0, seed=0) != arrival_offsets(2000, 10.0, seed=1)
    assert offsets[0] == 0 and offsets == sorted(offsets)
    assert offsets[-1] / 1999 == pytest.approx(0.1, rel=0.1)  # mean gap 1/rate
    windows = prompt_windows(8, 24, seed=5)
    assert windows == prompt_windows(8, 24, seed=5)
    assert {len(w) for w in windows} == {24} and len({tuple(w) for w in windows}) == 8


def test_failures_counted_and_rendered(live_server, fixed_run, tmp_path):
    # An unknown KV policy is a 400 for every request: counted, not raised.
    bad = _load(
        live_server,
        prompt_tokens=8,
        output_tokens=2,
        num_requests=2,
        concurrency=2,
        extra_body={"kv_policy": "no-such-policy"},
        name="bad",
    )
    assert (bad["completed"], bad["failed_by_code"]) == (0, {"400": 2})
    assert bad["ttft_ms"]["p50"] is None and bad["output_throughput"] == 0

    lines = render_table([fixed_run, bad]).splitlines()
    assert len(lines) == 4 and lines[0].startswith("| label | completed | req/s | output tok/s")
    assert "TTFT p99 (ms)" in lines[0] and "peak KV usage" in lines[0]
    assert lines[2].startswith(f"| fixed | {NUM}/{NUM} |") and "n/a" not in lines[2]
    assert lines[3].startswith("| bad | 0/2 |") and "n/a" in lines[3]

    json_path, md_path = write_results(fixed_run, tmp_path)
    assert json.loads(json_path.read_text())["total_output_tokens"] == NUM * OUTPUT_TOKENS
    assert lines[2] in md_path.read_text()


def test_kv_pressure_flag_goes_into_every_body():
    from bench.serve.__main__ import parse_args

    args = parse_args(["--model", "m", "--rate", "2", "--kv-pressure", "squeeze"])
    assert args.extra_body == {"kv_pressure": "squeeze"}
    args = parse_args(
        [
            "--model",
            "m",
            "--rate",
            "2",
            "--extra-body",
            '{"kv_ratio": 0.3}',
            "--kv-pressure",
            "preempt",
        ]
    )
    assert args.extra_body == {"kv_ratio": 0.3, "kv_pressure": "preempt"}


def test_a_mixed_load_spreads_its_full_requests_evenly():
    from bench.serve.runner import is_full

    assert [is_full(i, 0.25) for i in range(8)] == [False, False, False, True] * 2
    assert sum(is_full(i, 0.5) for i in range(100)) == 50
    assert not any(is_full(i, 0.0) for i in range(10)) and all(is_full(i, 1.0) for i in range(10))
