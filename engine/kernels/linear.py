"""Linear layers on the CPU through oneDNN with weights packed once at load.

torch's nn.Linear on the CPU calls MKL's sgemm on the plain weight every time;
oneDNN's matmul on a weight reordered once into its blocked layout is 15-30%
faster on this project's CPUs at every batch size (measured: 155-180 against
200-206 GFLOP/s on a 2-core AVX-512 EPYC, M = 64 to 2048), and the linear
layers are most of a step. Same math, a different summation order.

bfloat16 models are packed too where the CPU multiplies bfloat16 in hardware
(AVX-512-BF16 or AMX, the CPUs where `dtype="auto"` picks bfloat16). With AMX,
oneDNN runs them on its tiles (brg_matmul on avx512_core_amx). With
AVX-512-BF16 alone, the project's own kernel runs them
(csrc/linear_bf16_cpu.cpp): oneDNN's avx512_core_bf16 matmul reads a decode
step's weights at a fraction of the memory's speed, and over SmolLM2-135M's
linears on a 2-core EPYC the kernel is 2x faster at M = 1, 1.25x at M = 16,
1.14x at M = 64 and 1-2% slower at M = 512-2048 (prompt chunks;
bench/results/bf16_linear/, `python -m bench.linear_bf16`).
Where neither is possible bfloat16 keeps nn.Linear (oneDNN would convert in
software). The load log names the kernel that runs.
"""

import logging

import torch
import torch.nn.functional as F
from torch import nn

from engine.host.cpu_features import has_amx, has_bf16_matmul
from engine.host.huge_pages import gather_on_huge_pages
from engine.kernels import cpu as kernels
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


class Bf16Linear(nn.Module):
    """y = x W^T + b in bfloat16 through the project's AVX-512-BF16 kernel,
    W packed once into its panels (inference only)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        ops = kernels.ops()
        self.packed = ops.pack_linear_bf16(linear.weight.detach())
        self._linear = ops.linear_bf16  # looked up once: forward is on every step's path
        # Added in float32 before the one rounding, as torch does.
        self.bias = None if linear.bias is None else linear.bias.detach().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        out = self._linear(rows, self.packed, self.out_features, self.bias)
        return out.view(*shape, self.out_features)


def _works(make: type[nn.Module], dtype: torch.dtype) -> bool:
    """`make` builds here and agrees with F.linear on a small case (odd
    widths, a bias)."""
    try:
        linear = nn.Linear(9, 37, dtype=dtype)
        x = torch.randn(3, 9, dtype=dtype)
        got = make(linear)(x)
    except (RuntimeError, AttributeError) as e:
        logger.info("%s unavailable (%s)", make.__name__, e)
        return False
    return torch.allclose(got.float(), F.linear(x, linear.weight, linear.bias).float(), atol=1e-2)


def own_bf16_kernel() -> bool:
    """Whether the C++ kernels are built here with the bf16 linear kernel
    (a build without AVX-512-BF16 refuses to pack)."""
    if not kernels.loaded():
        return False
    try:
        kernels.ops().pack_linear_bf16(torch.zeros(1, 2, dtype=torch.bfloat16))
    except RuntimeError:
        return False
    return True


def _packing(dtype: torch.dtype) -> type[nn.Module] | None:
    """The layer CPU linears of `dtype` become on this machine, None to keep nn.Linear."""
    if dtype == torch.bfloat16 and not has_bf16_matmul():
        return None
    if dtype not in (torch.float32, torch.bfloat16):
        return None
    own_kernel = dtype == torch.bfloat16 and not has_amx() and own_bf16_kernel()
    if own_kernel and _works(Bf16Linear, dtype):
        return Bf16Linear
    if torch.backends.mkldnn.is_available() and _works(PackedLinear, dtype):
        return PackedLinear
    return None


def pack_linears(model: nn.Module) -> int:
    """Swap every nn.Linear of a CPU float32 (or, where the CPU multiplies
    bfloat16 in hardware, bfloat16) model for a packed layer (PackedLinear
    for oneDNN, or Bf16Linear); returns how many."""
    params = list(model.parameters())
    if not params or params[0].device.type != "cpu":
        return 0
    packing = _packing(params[0].dtype)
    if packing is None:
        return 0
    swapped, last = 0, None
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                last = packing(child)
                setattr(parent, name, last)
                swapped += 1
    if packing is Bf16Linear:
        _share_huge_pages(model)
    if last is not None:
        _log_kernel(last, params[0].dtype, swapped)
    return swapped


def _share_huge_pages(model: nn.Module) -> None:
    """Move the model's Bf16Linear weights into one allocation on huge pages:
    a decode step streams all of them, and with 4 KB pages the TLB misses
    cost up to a fifth of a one-row step."""
    layers = [m for m in model.modules() if isinstance(m, Bf16Linear)]
    for layer, packed in zip(layers, gather_on_huge_pages([m.packed for m in layers]), strict=True):
        layer.packed = packed


def _log_kernel(layer: nn.Module, dtype: torch.dtype, count: int) -> None:
    name = str(dtype).removeprefix("torch.")
    if isinstance(layer, Bf16Linear):
        logger.info("linear layers: %d packed for keyserve's avx512_bf16 kernel, %s", count, name)
        return
    x = torch.zeros(16, layer.in_features, dtype=dtype)
    kernel = kernel_of(lambda: layer(x))
    logger.info(
        "linear layers: %d packed for oneDNN, %s, kernel %s",
        count,
        name,
        kernel or "not read (see ONEDNN_VERBOSE=1's lines)",
    )
