"""The project's AVX-512-BF16 linear kernel (csrc/linear_bf16_cpu.cpp, used
for bfloat16 models on CPUs without AMX): y = x W^T + b from a weight packed
in 32-column panels, float32 sums rounded once; and the choice of layer at load."""

import os

import pytest
import torch
from portable_build import PORTABLE_FLAGS, compiler_defines, run_with_flags
from torch import nn

from engine.host.cpu_features import has_bf16_matmul
from engine.kernels import cpu as kernels
from engine.kernels import linear as linear_module
from engine.kernels.linear import Bf16Linear, PackedLinear, own_bf16_kernel, pack_linears

pytestmark = pytest.mark.skipif(
    not own_bf16_kernel(), reason="CPU kernels built without AVX-512-BF16"
)


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    ops = kernels.ops()
    return ops.linear_bf16(x, ops.pack_linear_bf16(w), w.shape[0], b)


# Rows across the 8-row tiles, widths across the 32-column panels, odd K.
SHAPES = [(1, 576, 960), (5, 9, 37), (8, 64, 32), (13, 100, 100), (70, 37, 576), (16, 1536, 33)]


@pytest.mark.parametrize("m, k, n", SHAPES)
def test_small_integers_give_the_exact_product(m, k, n):
    # Integer values: every float32 sum is exact and every result a bf16
    # integer, so any misplaced word of the packed layout shows.
    g = torch.Generator().manual_seed(m * k + n)
    x = torch.randint(-2, 3, (m, k), generator=g).bfloat16()
    w = torch.randint(-2, 3, (n, k), generator=g).bfloat16()
    b = torch.randint(-3, 4, (n,), generator=g).float()
    assert torch.equal(_linear(x, w), (x.float() @ w.float().t()).bfloat16())
    assert torch.equal(_linear(x, w, b), (x.float() @ w.float().t() + b).bfloat16())


@pytest.mark.parametrize("m, k, n", SHAPES)
def test_real_values_round_the_float32_sum_once(m, k, n):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(m, k, generator=g).bfloat16()
    w = (torch.randn(n, k, generator=g) / k**0.5).bfloat16()
    b = torch.randn(n, generator=g)
    got = _linear(x, w, b).float()
    want = x.double() @ w.double().t() + b.double()
    # One rounding to bfloat16 of a float32 sum: within half a bf16 step of
    # the exact value, plus float32's summation error.
    assert bool(((got - want).abs() <= want.abs() * 2**-8 + 1e-5 * k).all())
    # And where torch's float32 product rounds clear of a bf16 boundary, equal.
    assert (got == (x.float() @ w.float().t() + b).bfloat16().float()).float().mean() > 0.98


def test_rows_of_a_wider_tensor_are_read_in_place():
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(6, 200, generator=g).bfloat16()
    w = torch.randn(40, 64, generator=g).bfloat16()
    x = wide[:, 10:74]  # row stride 200
    assert torch.equal(_linear(x, w), _linear(x.contiguous(), w))


def test_no_rows_gives_an_empty_result():
    w = torch.randn(40, 64).bfloat16()
    assert _linear(torch.zeros(0, 64, dtype=torch.bfloat16), w).shape == (0, 40)


def test_bad_inputs_are_refused():
    ops = kernels.ops()
    packed = ops.pack_linear_bf16(torch.randn(40, 64).bfloat16())
    with pytest.raises(RuntimeError, match="x: \\[M, K\\] bfloat16"):
        ops.linear_bf16(torch.randn(2, 64), packed, 40, None)
    with pytest.raises(RuntimeError, match="another shape"):
        ops.linear_bf16(torch.randn(2, 66).bfloat16(), packed, 40, None)
    with pytest.raises(RuntimeError, match="another shape"):
        ops.linear_bf16(torch.randn(2, 64).bfloat16(), packed, 80, None)
    with pytest.raises(RuntimeError, match="bias"):
        ops.linear_bf16(torch.randn(2, 64).bfloat16(), packed, 40, torch.zeros(39))
    with pytest.raises(RuntimeError, match="weight"):
        ops.pack_linear_bf16(torch.randn(40, 64))


# -- which layer a bfloat16 model's linears become ------------------------------


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(100, 37), nn.Linear(37, 576, bias=False)).bfloat16().eval()


@pytest.mark.skipif(not has_bf16_matmul(), reason="bf16 linears stay nn.Linear here")
def test_without_amx_bf16_linears_take_the_projects_kernel(monkeypatch):
    monkeypatch.setattr(linear_module, "has_amx", lambda: False)
    model = _model()
    x = torch.randn(3, 7, 100).bfloat16()  # leading dimensions kept
    with torch.no_grad():
        want = model(x)
        assert pack_linears(model) == 2
        got = model(x)
    assert all(isinstance(m, Bf16Linear) for m in model)
    assert got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=1e-2)


@pytest.mark.skipif(not has_bf16_matmul(), reason="bf16 linears stay nn.Linear here")
def test_with_amx_or_without_the_kernels_onednn_runs_them(monkeypatch):
    monkeypatch.setattr(linear_module, "has_amx", lambda: True)
    model = _model()
    assert pack_linears(model) == 2 and all(isinstance(m, PackedLinear) for m in model)
    monkeypatch.setattr(linear_module, "has_amx", lambda: False)
    monkeypatch.setattr(kernels, "loaded", lambda: False)
    model = _model()
    assert pack_linears(model) == 2 and all(isinstance(m, PackedLinear) for m in model)


@pytest.mark.skipif(not has_bf16_matmul(), reason="bf16 linears stay nn.Linear here")
def test_kernels_built_without_avx512_bf16_leave_the_linears_to_onednn(monkeypatch):
    class PortableOps:  # what a build without the instructions answers
        def pack_linear_bf16(self, weight):
            raise RuntimeError("linear_bf16: these kernels were built without AVX-512-BF16")

    monkeypatch.setattr(linear_module, "has_amx", lambda: False)
    monkeypatch.setattr(kernels, "ops", PortableOps)
    model = _model()
    assert pack_linears(model) == 2 and all(isinstance(m, PackedLinear) for m in model)


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86 instruction-set flags")
def test_a_build_without_avx512_refuses_in_words():
    assert "__AVX512BF16__" not in compiler_defines(PORTABLE_FLAGS.split())
    check = (
        "try:\n"
        "    torch.ops.keyserve.pack_linear_bf16(torch.zeros(4, 4, dtype=torch.bfloat16))\n"
        "except RuntimeError as e:\n"
        "    print('refused:', e)\n"
    )
    result = run_with_flags(("linear_bf16_cpu.cpp",), check)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "refused: linear_bf16: these kernels were built without AVX-512-BF16" in result.stdout
