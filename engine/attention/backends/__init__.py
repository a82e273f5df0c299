"""Attention backends, one class each, and the choice among them.

The choice is made once per layer, when the paged cache is bound (its device
and dtype are then known), from the layer's geometry and what is installed:

- `flashinfer`: FlashInfer's paged kernels (CUDA, half precision, its head
  sizes), wrapping the backend below for what it does not cover;
- `cpu`: the C++ kernels, on a CPU cache where they built;
- `torch`: gathers and SDPA, anywhere; the only one for ALiBi and sliding
  windows, which need each key's original position.

KEYSERVE_ATTENTION_BACKEND=torch|cpu|flashinfer forces one (an error where
it cannot run), as vLLM's VLLM_ATTENTION_BACKEND does.
"""

import os

from engine.attention import flashinfer as flashinfer_library
from engine.attention.backends.base import AttentionBackend
from engine.attention.backends.cpu import CpuBackend
from engine.attention.backends.flashinfer import FlashInferBackend
from engine.attention.backends.sdpa import TorchBackend
from engine.attention.geometry import LayerCache, LayerGeometry
from engine.kernels import cpu as cpu_kernels

BACKEND_ENV = "KEYSERVE_ATTENTION_BACKEND"
BACKENDS = ("torch", "cpu", "flashinfer")


def select_backend(geometry: LayerGeometry, cache: LayerCache) -> AttentionBackend:
    """The best backend for this layer and cache, or the one the environment forces."""
    forced = os.environ.get(BACKEND_ENV, "").strip().lower() or None
    if forced is not None and forced not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV} must be one of {list(BACKENDS)}, got {forced!r}")
    base = _base_backend(geometry, cache, forced)
    if forced in (None, "flashinfer") and _flashinfer_applies(geometry, cache):
        return FlashInferBackend(base)
    if forced is not None and forced != base.name:
        raise ValueError(f"{BACKEND_ENV}={forced} cannot run here ({_why_not(forced)})")
    return base


def _base_backend(geometry: LayerGeometry, cache: LayerCache, forced: str | None) -> TorchBackend:
    cpu = (
        forced != "torch"
        and cache.k.device.type == "cpu"
        and not geometry.needs_key_positions
        and cpu_kernels.loaded()
    )
    return CpuBackend(geometry, cache) if cpu else TorchBackend(geometry, cache)


def _flashinfer_applies(geometry: LayerGeometry, cache: LayerCache) -> bool:
    """Installed, covering this device, dtype and head size, and no ALiBi or
    sliding window (FlashInfer measures both by slot, and after eviction a
    key's slot is no longer its position)."""
    return not geometry.needs_key_positions and flashinfer_library.available(
        cache.k, geometry.head_dim
    )


def _why_not(name: str) -> str:
    if name == "cpu":
        return "needs a CPU cache, no ALiBi or sliding window, and the C++ kernels built"
    return "needs FlashInfer installed, CUDA, half precision, and no ALiBi or sliding window"


__all__ = [
    "BACKENDS",
    "BACKEND_ENV",
    "AttentionBackend",
    "CpuBackend",
    "FlashInferBackend",
    "TorchBackend",
    "select_backend",
]
