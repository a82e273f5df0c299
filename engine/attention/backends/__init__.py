"""Attention backends, one class each, and the choice among them.

The choice is made once per layer, when the paged cache is bound (its device
and dtype are then known), from the layer's geometry and what is installed:

- `cpu`: the C++ kernels, on a CPU cache where they built;
- `triton`: our Triton kernels, the default on CUDA (Triton ships with
  torch's CUDA wheels); on a CPU only in Triton's interpreter, when forced;
- `flashinfer`: FlashInfer's paged kernels for full attention where it is
  installed (CUDA, half precision, its head sizes), wrapping the backend
  above for what it does not cover;
- `torch`: gathers and SDPA, anywhere; the only one for ALiBi and sliding
  windows, which need each key's original position.

KEYSERVE_ATTENTION_BACKEND=torch|cpu|triton|flashinfer forces one (an error
where it cannot run), as vLLM's VLLM_ATTENTION_BACKEND does.
"""

import importlib.util
import os

from engine.attention import flashinfer as flashinfer_library
from engine.attention.backends.base import AttentionBackend
from engine.attention.backends.cpu import CpuBackend
from engine.attention.backends.flashinfer import FlashInferBackend
from engine.attention.backends.sdpa import TorchBackend
from engine.attention.geometry import LayerCache, LayerGeometry
from engine.kernels import cpu as cpu_kernels

BACKEND_ENV = "KEYSERVE_ATTENTION_BACKEND"
BACKENDS = ("torch", "cpu", "triton", "flashinfer")


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
    if forced == "torch" or geometry.needs_key_positions:
        return TorchBackend(geometry, cache)
    on_cpu = cache.k.device.type == "cpu"
    wants_triton = forced == "triton" or (forced in (None, "flashinfer") and not on_cpu)
    if wants_triton and _triton_runs(on_cpu):
        from engine.attention.backends.triton import TritonBackend  # imports triton

        return TritonBackend(geometry, cache)
    if on_cpu and forced in (None, "cpu", "flashinfer") and cpu_kernels.loaded():
        return CpuBackend(geometry, cache)
    return TorchBackend(geometry, cache)


def _triton_runs(on_cpu: bool) -> bool:
    """Triton is installed, and this is CUDA or its interpreter."""
    if importlib.util.find_spec("triton") is None:
        return False
    return not on_cpu or os.environ.get("TRITON_INTERPRET") == "1"


def _flashinfer_applies(geometry: LayerGeometry, cache: LayerCache) -> bool:
    """Installed, covering this device, dtype and head size, and no ALiBi or
    sliding window (FlashInfer measures both by slot, and after eviction a
    key's slot is no longer its position)."""
    return not geometry.needs_key_positions and flashinfer_library.available(
        cache.k, geometry.head_dim
    )


def _why_not(name: str) -> str:
    return {
        "cpu": "needs a CPU cache, no ALiBi or sliding window, and the C++ kernels built",
        "triton": "needs Triton, and CUDA or TRITON_INTERPRET=1; no ALiBi or sliding window",
        "flashinfer": "needs FlashInfer, CUDA, half precision, no ALiBi or sliding window",
    }[name]


__all__ = [
    "BACKENDS",
    "BACKEND_ENV",
    "AttentionBackend",
    "CpuBackend",
    "FlashInferBackend",
    "TorchBackend",
    "select_backend",
]
