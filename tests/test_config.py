from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml

from engine.config import EngineConfig, parse_bytes
from engine.host import cpu_features
from kv_manager.policies import KV_POLICY_FIELDS, KVPolicySettings
from server.config import ServeConfig

ROOT = Path(__file__).resolve().parents[1]


def test_default_yaml_mirrors_the_dataclass():
    data = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())["engine"]
    assert data == asdict(EngineConfig())


def test_kv_defaults_are_kv_policy_settings():
    """One default policy: EngineConfig's and the shipped YAML's KV keys are
    KVPolicySettings's fields and defaults, keyformer at 0.5."""
    data = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())["engine"]
    defaults = asdict(KVPolicySettings())
    assert {k: data[k] for k in KV_POLICY_FIELDS} == defaults
    assert EngineConfig().kv_policy_settings() == KVPolicySettings()
    assert (defaults["kv_policy"], defaults["kv_ratio"]) == ("keyformer", 0.5)


def test_kv_settings_are_flat_fields_and_keys(tmp_path):
    config = EngineConfig(kv_policy="full", kv_min_tokens=0)
    assert (config.kv_policy, config.kv_min_tokens, config.kv_ratio) == ("full", 0, 0.5)
    assert not config.kv_policy_settings().evicts
    path = tmp_path / "c.yaml"
    path.write_text("engine:\n  kv_policy: h2o\n  recent_ratio: 0.5\n")
    config = EngineConfig.from_yaml(path, kv_ratio=0.25)
    assert (config.kv_policy, config.recent_ratio, config.kv_ratio) == ("h2o", 0.5, 0.25)


@pytest.mark.parametrize(
    "yaml_text, field",
    [
        ("engine:\n  kv_policy: lru\n", "kv_policy"),
        ("engine:\n  kv_ratio: 0\n", "kv_ratio"),
        ("engine:\n  kv_min_tokens: lots\n", "kv_min_tokens"),
    ],
)
def test_bad_kv_config_is_named(tmp_path, yaml_text, field):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ValueError, match=rf"^{field} must be "):
        EngineConfig.from_yaml(path)


def test_default_yaml_server_section_mirrors_serve_config():
    data = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())["server"]
    assert data == asdict(ServeConfig())
    # The shipped file loads as both halves.
    assert ServeConfig.from_yaml(ROOT / "configs" / "default.yaml") == ServeConfig()
    assert EngineConfig.from_yaml(ROOT / "configs" / "default.yaml") == EngineConfig()


def test_server_section_alone_is_a_valid_config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("server:\n  max_waiting: 8\n  max_request_bytes: 4096\n")
    assert EngineConfig.from_yaml(path) == EngineConfig()
    serve = ServeConfig.from_yaml(path, max_waiting=None, port=9000)
    assert (serve.max_waiting, serve.max_request_bytes, serve.port) == (8, 4096, 9000)


@pytest.mark.parametrize(
    "yaml_text, field",
    [
        ("server:\n  max_wating: 8\n", "max_wating"),
        ("server:\n  max_request_bytes: 0\n", "max_request_bytes"),
        ("server:\n  port: 70000\n", "port"),
        ("server:\n  log_level: loud\n", "log_level"),
        ("server:\n  max_waiting: 0\n", "max_waiting"),
        ("server:\n  max_waiting: null\n", "max_waiting"),  # the queue is always bounded
    ],
)
def test_bad_server_config_is_named(tmp_path, yaml_text, field):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ValueError, match=field):
        ServeConfig.from_yaml(path)


def test_from_yaml_applies_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("engine:\n  block_size: 32\n  max_num_seqs: 4\n")
    config = EngineConfig.from_yaml(path, max_num_seqs=8)
    assert (config.block_size, config.max_num_seqs) == (32, 8)


def test_unknown_yaml_key_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("engine:\n  blok_size: 32\n")
    with pytest.raises(ValueError, match="blok_size"):
        EngineConfig.from_yaml(path)


@pytest.mark.parametrize(
    "text, expected", [("1GiB", 2**30), ("512MiB", 512 * 2**20), ("2GB", 2 * 10**9), (77, 77)]
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"dtype": "float8"}, "dtype"),
        ({"block_size": 0}, "block_size"),
        ({"kv_cache_bytes": "lots"}, "lots"),
        ({"device": "tpu"}, "device"),
    ],
)
def test_bad_values_are_named(kwargs, field):
    with pytest.raises(ValueError, match=field):
        EngineConfig(**kwargs)


CPUINFO = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 avx512f {extra}\n"


@pytest.mark.parametrize(
    "flags, device, want",
    [
        ("avx512_bf16", "cpu", torch.bfloat16),
        ("amx_bf16 amx_tile", "cpu", torch.bfloat16),
        ("avx512_vnni", "cpu", torch.float32),
        ("", "cpu", torch.float32),
        ("", "cuda", torch.bfloat16),
    ],
)
def test_auto_dtype_follows_the_cpu_flags(monkeypatch, tmp_path, flags, device, want):
    """auto: bfloat16 where the CPU multiplies bf16 in hardware (flags read
    from /proc/cpuinfo, here a stand-in) and on CUDA, float32 elsewhere; an
    explicit dtype wins everywhere."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(CPUINFO.format(extra=flags))
    real_path = cpu_features.Path
    monkeypatch.setattr(
        cpu_features, "Path", lambda p: cpuinfo if p == "/proc/cpuinfo" else real_path(p)
    )
    cpu_features.cpu_flags.cache_clear()
    try:
        assert cpu_features.has_bf16_matmul() == (want == torch.bfloat16 and device == "cpu")
        assert EngineConfig(device=device).torch_dtype() == want
        assert EngineConfig(device=device, dtype="float32").torch_dtype() == torch.float32
        assert EngineConfig(device=device, dtype="bfloat16").torch_dtype() == torch.bfloat16
    finally:
        cpu_features.cpu_flags.cache_clear()


def test_cpu_flags_without_a_flags_line(monkeypatch, tmp_path):
    """An Arm /proc/cpuinfo lists `Features`, no `flags`: no bf16 matmul, float32."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")
    monkeypatch.setattr(cpu_features, "Path", lambda p: cpuinfo)
    cpu_features.cpu_flags.cache_clear()
    try:
        assert cpu_features.cpu_flags() == frozenset()
        assert EngineConfig(device="cpu").torch_dtype() == torch.float32
    finally:
        cpu_features.cpu_flags.cache_clear()
