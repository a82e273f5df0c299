"""Building blocks shared by the model families: norms, RoPE, activations."""

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.kernels.cpu import loaded as layer_ops_loaded

# The dtypes the C++ layer ops take: bfloat16 rows are computed in float32
# and rounded where transformers' bfloat16 modules round (layer_ops_cpu.cpp).
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def _fused(*tensors: torch.Tensor) -> bool:
    """The C++ layer ops apply: CPU rows [T, ...] of one dtype (float32 or
    bfloat16) with a contiguous last dim, and the kernels loaded. Anything
    else takes the torch ops."""
    dtype = tensors[0].dtype
    on_cpu = dtype in _KERNEL_DTYPES and all(
        t.device.type == "cpu" and t.dtype == dtype and t.stride(-1) == 1 for t in tensors
    )
    return on_cpu and layer_ops_loaded()


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 like the reference models.

    Called with a residual, it is the pre-norm block's residual step as well:
    returns (norm(x + residual), x + residual), in place on the CPU (one pass
    over the rows instead of seven ops).
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            if x.dim() == 2 and _fused(x, self.weight):
                out = torch.empty_like(x, memory_format=torch.contiguous_format)
                torch.ops.keyserve.rms_norm(out, x, self.weight, self.eps)
                return out
            return self._norm(x)
        if x.dim() == 2 and _fused(x, residual, self.weight):
            torch.ops.keyserve.add_rms_norm(x, residual, self.weight, self.eps)
            return x, residual
        residual = x + residual
        return self._norm(residual), residual

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "relu": F.relu,
}


def merge_linears(*linears: nn.Linear) -> nn.Linear:
    """One linear whose output is the given ones' outputs side by side (same input)."""
    first = linears[0]
    biases = [lin.bias for lin in linears]
    merged = nn.Linear(
        first.in_features,
        sum(lin.out_features for lin in linears),
        bias=biases[0] is not None,
        device=first.weight.device,
        dtype=first.weight.dtype,
    )
    with torch.no_grad():
        merged.weight.copy_(torch.cat([lin.weight for lin in linears]))
        if merged.bias is not None:
            merged.bias.copy_(torch.cat(biases))
    return merged.requires_grad_(first.weight.requires_grad)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU on a merged projection: [T, 2I] -> silu(gate) * up, [T, I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    if gate_up.dim() == 2 and _fused(gate_up):
        out = gate_up.new_empty(gate.shape)
        torch.ops.keyserve.silu_and_mul(out, gate_up)
        return out
    return F.silu(gate) * up


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def rope_parameters(config: Any) -> dict:
    """RoPE settings from a transformers config, old (rope_theta + rope_scaling)
    or new (rope_parameters) style."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None) or {}
    for key, value in scaling.items():
        params.setdefault(key, value)
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params["type"]
    params.setdefault("rope_type", "default")
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return params


def rope_inv_freq(rotary_dim: int, params: dict, max_position: int) -> torch.Tensor:
    """Inverse frequencies for `rotary_dim` rotated dims, with rope scaling applied."""
    base = float(params["rope_theta"])
    # float32 throughout, as the reference implementations compute it, so
    # angles at long positions match theirs bit for bit.
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    inv_freq = 1.0 / (base**exponents)
    kind = params["rope_type"]
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(params["factor"])
    if kind == "llama3":
        return _llama3_scale(inv_freq, params)
    raise ValueError(f"unsupported rope scaling {kind!r}; supported: default, linear, llama3")


def _llama3_scale(inv_freq: torch.Tensor, p: dict) -> torch.Tensor:
    # Long wavelengths are slowed by `factor`, short ones kept, and the band
    # between them interpolated smoothly (Llama 3.1's scheme).
    factor, low, high = (
        float(p["factor"]),
        float(p["low_freq_factor"]),
        float(p["high_freq_factor"]),
    )
    old_len = float(p["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return torch.where(mid, interpolated, out)


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables, applied to the first `rotary_dim` dims.

    `interleaved=False` rotates the two halves (Llama, GPT-NeoX);
    `interleaved=True` rotates even/odd pairs (GPT-J).
    """

    def __init__(
        self, rotary_dim: int, params: dict, max_position: int, interleaved: bool = False
    ) -> None:
        super().__init__()
        self.rotary_dim = rotary_dim
        self.interleaved = interleaved
        inv_freq = rope_inv_freq(rotary_dim, params, max_position)
        t = torch.arange(max_position, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # [max_position, rotary_dim / 2]
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [T]; q: [T, Hq, D]; k: [T, Hkv, D]
        if self._rotate_in_place(positions, q, k):
            return q, k
        cos = self.cos[positions].unsqueeze(1)  # [T, 1, rotary_dim / 2]
        sin = self.sin[positions].unsqueeze(1)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate_in_place(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> bool:
        """Rotate q and k in place with the C++ op, where it applies: halves
        (not pairs), CPU heads laid out one after another, float32 tables."""
        if self.interleaved or q.dim() != 3 or positions.dtype != torch.int64:
            return False
        if self.cos.dtype != torch.float32 or self.cos.device.type != "cpu" or not _fused(q, k):
            return False
        if q.stride(1) != q.shape[2] or k.stride(1) != k.shape[2]:
            return False
        torch.ops.keyserve.rotary_(q, k, positions.contiguous(), self.cos, self.sin)
        return True

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        dtype = x.dtype
        rot = rot.float()
        if self.interleaved:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
            out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        else:
            x1, x2 = rot.chunk(2, dim=-1)
            out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return torch.cat((out.to(dtype), rest), dim=-1)
