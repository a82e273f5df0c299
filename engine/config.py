"""One validated configuration for the engine, loadable from YAML."""

import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import yaml

from engine.host import cpu_features
from kv_manager.policies import KVPolicyDefaults

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(value: int | str) -> int:
    """1024, "512MiB", "2GB" -> bytes."""
    if isinstance(value, int):
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise ValueError(f"cannot read {value!r} as a size (e.g. 512MiB, 2GB)")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "B").lower()])


def from_section(cls: type, section: dict[str, Any], what: str, overrides: dict[str, Any]) -> Any:
    """`cls(**section)` with `overrides` that are not None on top; a key that is
    not a field of `cls` is an error naming it (`what` says where it came from)."""
    unknown = sorted(set(section) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(f"unknown {what}: {unknown}")
    return cls(**{**section, **{k: v for k, v in overrides.items() if v is not None}})


@dataclass
class EngineConfig(KVPolicyDefaults):
    """The engine's settings. The default KV policy of requests that set none
    (kv_policy, kv_ratio, ...: keyformer.md) comes with KVPolicyDefaults: the
    fields of kv_manager's KVPolicySettings, with its defaults and checks, as
    flat keyword-only fields and YAML keys; `kv_policy_settings()` reads them."""

    # A folder with config.json + safetensors, a .gguf file, or None for the
    # embedded default (SmolLM2-135M-Instruct).
    model: str | None = None
    # "auto": bfloat16 on CUDA, and on a CPU that multiplies bfloat16 in
    # hardware (AVX-512-BF16 or AMX); float32 on other CPUs.
    dtype: str = "auto"
    # "auto": CUDA when available.
    device: str = "auto"
    # Longest prompt + output; None: the model's own context length.
    max_model_len: int | None = None
    block_size: int = 16
    # KV pool size: `kv_cache_blocks` wins when set, else `kv_cache_bytes`.
    kv_cache_bytes: int | str = "1GiB"
    kv_cache_blocks: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    # Skip loading a tokenizer: prompts must then be token ids, and outputs
    # carry token ids only.
    skip_tokenizer_init: bool = False
    seed: int = 0
    # Run decode steps eagerly: no CUDA graphs (vLLM's flag). Graphs apply on
    # CUDA with the Triton attention backend; elsewhere this changes nothing.
    enforce_eager: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()  # the KV defaults
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be auto or one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.kv_cache_blocks is not None and self.kv_cache_blocks < 1:
            raise ValueError(f"kv_cache_blocks must be positive, got {self.kv_cache_blocks}")
        if parse_bytes(self.kv_cache_bytes) <= 0:
            raise ValueError(f"kv_cache_bytes must be positive, got {self.kv_cache_bytes!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "EngineConfig":
        """Read the `engine:` section of a YAML config; `overrides` win."""
        data = yaml.safe_load(Path(path).read_text()) or {}
        # A file of sections (engine:, server:) or a bare engine section.
        sectioned = "engine" in data or "server" in data
        section = dict(data.get("engine") or {}) if sectioned else data
        return from_section(cls, section, f"engine config keys in {path}", overrides)

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self) -> torch.dtype:
        if self.dtype != "auto":
            return _DTYPES[self.dtype]
        if self.torch_device().type == "cuda" or cpu_features.has_bf16_matmul():
            return torch.bfloat16
        # Without bfloat16 instructions oneDNN converts in software: float32 is faster.
        return torch.float32
