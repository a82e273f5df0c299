"""Linear layers packed for oneDNN (engine/kernels/linear.py): float32 always,
bfloat16 where the CPU multiplies bf16 in hardware (with AMX; without it the
project's kernel, tests/test_linear_bf16_kernel.py), nn.Linear kept
elsewhere; the load log names the oneDNN kernel, read from its verbose lines."""

import logging

import pytest
import torch
from torch import nn

from engine.host.cpu_features import has_amx, has_bf16_matmul
from engine.kernels import linear as linear_module
from engine.kernels.linear import Bf16Linear, PackedLinear, own_bf16_kernel, pack_linears
from engine.kernels.onednn import implementation

pytestmark = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN"
)
needs_bf16 = pytest.mark.skipif(
    not has_bf16_matmul(), reason="no AVX-512-BF16 or AMX: bf16 linears stay nn.Linear"
)


def _model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    # Odd widths: the packed layout pads them.
    return nn.Sequential(nn.Linear(100, 37), nn.Linear(37, 576, bias=False)).to(dtype).eval()


def _packed_kernel(caplog) -> str:
    (record,) = [r for r in caplog.records if "packed for oneDNN" in r.getMessage()]
    return record.getMessage().rsplit("kernel ", 1)[1]


@needs_bf16
@pytest.mark.parametrize("rows", [1, 16, 300])
def test_bf16_linears_are_packed_and_agree(rows, caplog, monkeypatch):
    # oneDNN's path, as on an AMX CPU (tests/test_linear_bf16_kernel.py has
    # the project's own kernel, which runs them where there is no AMX).
    monkeypatch.setattr(linear_module, "has_amx", lambda: True)
    model = _model(torch.bfloat16)
    x = torch.randn(rows, 100).bfloat16()
    with torch.no_grad():
        first, second = (m.float() for m in _model(torch.bfloat16))
        want = second(first(x.float()).bfloat16().float())  # float32 products, bf16 between
        ref = model[1](model[0](x))
        with caplog.at_level(logging.INFO, logger=linear_module.__name__):
            assert pack_linears(model) == 2
        got = model(x)
    assert all(isinstance(m, PackedLinear) for m in model)
    assert got.dtype == torch.bfloat16
    # Products and sums in float32, each output rounded once: within bf16's
    # rounding of the float32 product and of nn.Linear's result.
    torch.testing.assert_close(got.float(), want, rtol=2**-7, atol=1e-2)
    torch.testing.assert_close(got.float(), ref.float(), rtol=2**-7, atol=1e-2)
    kernel = _packed_kernel(caplog)
    assert "bf16" in kernel or "amx" in kernel, kernel


def test_bf16_stays_nn_linear_without_bf16_instructions(monkeypatch):
    monkeypatch.setattr(linear_module, "has_bf16_matmul", lambda: False)
    model = _model(torch.bfloat16)
    assert pack_linears(model) == 0
    assert all(type(m) is nn.Linear for m in model)
    float_model = _model(torch.float32)
    assert pack_linears(float_model) == 2


def test_float32_packing_names_its_kernel(caplog):
    model = _model(torch.float32)
    x = torch.randn(5, 100)
    with torch.no_grad():
        want = model(x)
        with caplog.at_level(logging.INFO, logger=linear_module.__name__):
            assert pack_linears(model) == 2
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
    assert "brg_matmul" in _packed_kernel(caplog) or "gemm" in _packed_kernel(caplog)


def test_half_precision_is_not_packed():
    assert pack_linears(_model(torch.float16)) == 0


@pytest.mark.parametrize(
    "verbose, want",
    [
        (
            "onednn_verbose,v1,info,oneDNN v3.7.1\n"
            "onednn_verbose,v1,primitive,exec,cpu,reorder,jit:uni,undef,src:bf16,,3072x576,0.1\n"
            "onednn_verbose,v1,primitive,exec,cpu,inner_product,brg_matmul:avx512_core_amx,"
            "forward_inference,src:bf16::blocked:ab::f0,,mb16ic576oc3072,0.02\n",
            "brg_matmul:avx512_core_amx",
        ),
        (
            "onednn_verbose,exec,cpu,matmul,brg:avx512_core_bf16,undef,src_bf16::blocked:ab:f0,"
            ",,16x576:576x3072,0.03\n",
            "brg:avx512_core_bf16",
        ),
        ("onednn_verbose,v1,primitive,exec,cpu,reorder,jit:uni,undef,,,3x4,0.1\n", None),
        ("some other line, matmul, exec\n", None),
    ],
)
def test_the_kernel_name_is_read_from_verbose_lines(verbose, want):
    assert implementation(verbose) == want


@needs_bf16
def test_a_bf16_llama_loads_packed(tmp_path):
    from tiny_models import build_tiny_model

    from engine import LLM

    llm = LLM(str(build_tiny_model("llama", tmp_path)), dtype="bfloat16", kv_cache_blocks=8)
    layer = llm.engine.model.model.layers[0]
    want = Bf16Linear if not has_amx() and own_bf16_kernel() else PackedLinear
    assert type(layer.self_attn.qkv_proj) is want
    if want is PackedLinear:
        assert layer.self_attn.qkv_proj.packed.dtype == torch.bfloat16
    else:  # every packed weight in one allocation on huge pages
        layers = [m for m in llm.engine.model.modules() if isinstance(m, Bf16Linear)]
        storages = {m.packed.untyped_storage().data_ptr() for m in layers}
        assert len(layers) > 4 and len(storages) == 1
