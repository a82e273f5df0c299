"""`keyserve serve`: its defaults, flags over config files, and a real SIGTERM drain."""

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from kv_manager.policies import KV_SETTINGS, KVPolicySettings
from server.cli import build_parser, serve_config, server_config

ROOT = Path(__file__).resolve().parents[1]


def test_serve_defaults_run_keyformer_on_loopback():
    args = build_parser().parse_args(["serve"])
    serve = server_config(args)
    assert (serve.host, serve.port, args.api_key is None) == ("127.0.0.1", 8000, True)
    config = serve_config(args)
    assert (config.model, config.kv_policy, config.kv_ratio) == (None, "keyformer", 0.5)


def test_flags_override_the_config_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("engine:\n  kv_policy: h2o\n  block_size: 32\n  kv_cache_bytes: 256MiB\n")
    args = build_parser().parse_args(
        ["serve", "--config", str(path), "--kv-ratio", "0.25", "--max-num-seqs", "4"]
    )
    config = serve_config(args)
    assert (config.kv_policy, config.kv_ratio, config.block_size) == ("h2o", 0.25, 32)
    assert (config.max_num_seqs, config.kv_cache_bytes) == (4, "256MiB")


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "--kv-cache-bytes", "1GiB", "--kv-cache-blocks", "10"],
        ["serve", "--kv-policy", "lru"],
        ["serve", "--max-waiting", "0"],
    ],
)
def test_bad_flags_exit(argv):
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)


def test_kv_defaults_hold_with_a_config_file_that_sets_none(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("engine:\n  block_size: 32\n")
    config = serve_config(build_parser().parse_args(["serve", "--config", str(path)]))
    assert config.kv_policy_settings() == KVPolicySettings()
    assert (config.kv_policy, config.kv_ratio) == ("keyformer", 0.5)


@pytest.mark.parametrize("command", ["serve", "generate"])
def test_every_kv_setting_has_a_flag(command):
    """The --kv-* flags are generated from KVPolicySettings: one per field,
    typed, unset unless given (so the config file keeps its say)."""
    prefix = [command] if command == "serve" else [command, "hi"]
    unset = build_parser().parse_args(prefix)
    assert all(getattr(unset, s.name) is None for s in KV_SETTINGS)
    argv = ["--kv-policy", "streaming", "--kv-ratio", "0.25", "--kv-max-tokens", "64"]
    argv += ["--kv-min-tokens", "0", "--recent-ratio", "0.5", "--sink-tokens", "2"]
    argv += ["--tau-init", "0.5", "--tau-end", "3", "--kv-pressure", "squeeze"]
    argv += ["--score-window", "16", "--snapkv-kernel", "5", "--snapkv-pooling", "avg"]
    argv += ["--decode-scoring", "frozen", "--kv-squeeze-min-ratio", "0.5"]
    args = build_parser().parse_args(prefix + argv)
    given = {s.name: getattr(args, s.name) for s in KV_SETTINGS if s.name != "kv_target_mass"}
    assert given == {
        "kv_policy": "streaming",
        "kv_ratio": 0.25,
        "kv_max_tokens": 64,
        "kv_min_tokens": 0,
        "recent_ratio": 0.5,
        "sink_tokens": 2,
        "tau_init": 0.5,
        "tau_end": 3.0,
        "score_window": 16,
        "snapkv_kernel": 5,
        "snapkv_pooling": "avg",
        "decode_scoring": "frozen",
        "kv_squeeze_min_ratio": 0.5,
        "kv_pressure": "squeeze",
    }
    assert all(type(given[s.name]) is s.kind for s in KV_SETTINGS if s.name in given)
    # The other budget rule, given instead of --kv-ratio.
    args = build_parser().parse_args(prefix + ["--kv-policy", "h2o", "--kv-target-mass", "0.95"])
    assert args.kv_target_mass == 0.95 and args.kv_ratio is None


def test_kv_flags_win_over_the_config_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("engine:\n  kv_policy: h2o\n  recent_ratio: 0.1\n  sink_tokens: 8\n")
    argv = ["serve", "--config", str(path), "--recent-ratio", "0.4", "--kv-policy", "full"]
    config = serve_config(build_parser().parse_args(argv))
    assert (config.kv_policy, config.recent_ratio, config.sink_tokens) == ("full", 0.4, 8)


def test_a_kv_ratio_flag_wins_over_the_config_files_target_mass(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("engine:\n  kv_policy: h2o\n  kv_target_mass: 0.9\n")
    config = serve_config(build_parser().parse_args(["serve", "--config", str(path)]))
    assert config.kv_policy_settings().chooses_budget and config.kv_target_mass == 0.9
    argv = ["serve", "--config", str(path), "--kv-ratio", "0.3"]
    config = serve_config(build_parser().parse_args(argv))
    assert (config.kv_ratio, config.kv_target_mass) == (0.3, None)


def test_kv_ratio_and_target_mass_flags_together_are_an_error():
    args = build_parser().parse_args(["serve", "--kv-ratio", "0.3", "--kv-target-mass", "0.9"])
    with pytest.raises(ValueError, match=r"^kv_target_mass and kv_ratio both set the budget"):
        serve_config(args)
    with pytest.raises(ValueError, match=r"^kv_target_mass needs a policy that scores keys"):
        serve_config(build_parser().parse_args(["serve", "--kv-policy", "window",
                                                "--kv-target-mass", "0.9"]))  # fmt: skip


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--kv-ratio", "1.5", "kv_ratio must be in (0, 1], got 1.5"),
        ("--tau-init", "0", "tau_init must be positive, got 0.0"),
        ("--kv-max-tokens", "0", "kv_max_tokens must be at least 1, got 0"),
        ("--kv-min-tokens", "1.5", "invalid int value: '1.5'"),
        ("--recent-ratio", "nan", "recent_ratio must be in [0, 1], got nan"),
        ("--kv-target-mass", "0", "kv_target_mass must be in (0, 1], got 0.0"),
    ],
)
def test_bad_kv_flag_exits_with_the_settings_message(capsys, flag, value, message):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", flag, value])
    assert message in capsys.readouterr().err


def test_kv_flag_help_comes_from_the_definition(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for s in KV_SETTINGS:
        assert "--" + s.name.replace("_", "-") in text
        assert " ".join(s.help.split()) in text
    assert "(default: keyformer)" in text and "in (0, 1] (default: 0.5)" in text


def test_generate_is_still_there():
    args = build_parser().parse_args(["generate", "hi", "--max-tokens", "3"])
    assert (args.prompt, args.max_tokens, args.chat) == ("hi", 3, True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_running_requests(url: str) -> float:
    """Requests the server holds (running + waiting), from its metrics."""
    text = httpx.get(f"{url}/metrics").text
    running = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(("keyserve:num_requests_running{", "keyserve:num_requests_waiting{"))
    ]
    return sum(running)


def _stream(url: str, result: dict, started: threading.Event) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 48, "temperature": 0}
    body |= {"ignore_eos": True, "stream": True}
    events = []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line:
                events.append(line)
                started.set()
    result["events"] = events


def _plain(url: str, result: dict) -> None:
    body = {"prompt": "The sea is", "max_tokens": 32, "temperature": 0, "ignore_eos": True}
    result["plain"] = httpx.post(f"{url}/v1/completions", json=body, timeout=120)


def test_sigterm_drains_then_exits():
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "server.cli", "serve", "--port", str(port)]
    cmd += ["--kv-cache-bytes", "64MiB", "--drain-timeout", "60", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)

        result: dict = {}
        started = threading.Event()
        streamer = threading.Thread(target=_stream, args=(url, result, started))
        streamer.start()
        assert started.wait(60)
        plain = threading.Thread(target=_plain, args=(url, result))  # accepted, not streamed
        plain.start()
        deadline = time.monotonic() + 30
        while proc_running_requests(url) < 2:  # both accepted before the signal
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while httpx.get(f"{url}/health").status_code == 200:  # the signal lands async
            assert time.monotonic() < deadline
            time.sleep(0.02)
        late = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert late.status_code == 503 and late.json()["error"]["code"] == "draining"

        streamer.join(120)
        plain.join(120)
        assert result["plain"].status_code == 200  # no accepted request is lost
        assert result["plain"].json()["choices"][0]["finish_reason"] == "length"
        events = result["events"]
        assert events[-1] == "data: [DONE]"
        last = json.loads(events[-2].removeprefix("data: "))
        assert last["choices"][0]["finish_reason"] == "length"  # ran to the end, not aborted
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
