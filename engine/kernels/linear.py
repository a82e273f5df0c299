"""Linear layers on the CPU through oneDNN with weights packed once at load.

torch's nn.Linear on the CPU calls MKL's sgemm on the plain weight every time;
oneDNN's matmul on a weight reordered once into its blocked layout is 15-30%
faster on this project's CPUs at every batch size (measured: 155-180 against
200-206 GFLOP/s on a 2-core AVX-512 EPYC, M = 64 to 2048), and the linear
layers are most of a step. Same math, a different summation order.

bfloat16 models are packed too where the CPU multiplies bfloat16 in hardware
(AVX-512-BF16 or AMX, the CPUs where `dtype="auto"` picks bfloat16): oneDNN
runs them as brg_matmul on avx512_core_bf16 or avx512_core_amx. Measured on a
2-core AVX-512-BF16 EPYC: 260 GFLOP/s packed against 214 for F.linear at
M = 16 (decode), both about 420 at M >= 512. Elsewhere bfloat16 keeps
nn.Linear (oneDNN would convert in software either way). The load log names
the kernel oneDNN runs.
"""

import logging

import torch
import torch.nn.functional as F
from torch import nn

from engine.host.cpu_features import has_bf16_matmul
from engine.kernels.onednn import kernel_of

logger = logging.getLogger(__name__)


class PackedLinear(nn.Module):
    """y = x W^T + b with W held in oneDNN's packed layout (inference only)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1]
        out = torch.ops.mkldnn._linear_pointwise(
            x.reshape(-1, self.in_features), self.packed, self.bias, "none", [], ""
        )
        return out.view(*shape, self.out_features)


def _works(dtype: torch.dtype) -> bool:
    """oneDNN is in this torch build and agrees with F.linear on a small case."""
    try:
        linear = nn.Linear(8, 4, dtype=dtype)
        x = torch.randn(3, 8, dtype=dtype)
        got = PackedLinear(linear)(x)
    except (RuntimeError, AttributeError) as e:
        logger.info("oneDNN packed linear unavailable (%s); keeping nn.Linear", e)
        return False
    return torch.allclose(got.float(), F.linear(x, linear.weight, linear.bias).float(), atol=1e-2)


def _packs(dtype: torch.dtype) -> bool:
    """Whether CPU linear layers of `dtype` are packed on this machine."""
    if dtype == torch.bfloat16 and not has_bf16_matmul():
        return False
    if dtype not in (torch.float32, torch.bfloat16):
        return False
    return torch.backends.mkldnn.is_available() and _works(dtype)


def pack_linears(model: nn.Module) -> int:
    """Swap every nn.Linear of a CPU float32 (or, where the CPU multiplies
    bfloat16 in hardware, bfloat16) model for a PackedLinear; returns how many."""
    params = list(model.parameters())
    if not params or params[0].device.type != "cpu" or not _packs(params[0].dtype):
        return 0
    swapped, last = 0, None
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                last = PackedLinear(child)
                setattr(parent, name, last)
                swapped += 1
    if last is not None:
        _log_kernel(last, params[0].dtype, swapped)
    return swapped


def _log_kernel(layer: PackedLinear, dtype: torch.dtype, count: int) -> None:
    x = torch.zeros(16, layer.in_features, dtype=dtype)
    kernel = kernel_of(lambda: layer(x))
    logger.info(
        "linear layers: %d packed for oneDNN, %s, kernel %s",
        count,
        str(dtype).removeprefix("torch."),
        kernel or "not read (see ONEDNN_VERBOSE=1's lines)",
    )
