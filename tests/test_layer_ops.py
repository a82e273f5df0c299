"""The fused C++ layer ops (engine/kernels/csrc/layer_ops_cpu.cpp) against the torch
ops they replace, and the merged q/k/v and gate/up projections against the
separate ones: odd widths (vector tails), views with a row stride, extreme
activations, and the in-place contracts the Llama layer relies on."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.kernels import cpu as cpu_kernels
from engine.models.common import RMSNorm, RotaryEmbedding, merge_linears, silu_and_mul

pytestmark = pytest.mark.skipif(
    not cpu_kernels.loaded(), reason="no C++ compiler here: the torch ops run instead"
)

ROPE = {"rope_type": "default", "rope_theta": 10000.0}


def _norm(width: int, seed: int) -> RMSNorm:
    norm = RMSNorm(width, 1e-5)
    norm.weight.data = torch.randn(width, generator=torch.Generator().manual_seed(seed))
    return norm


@pytest.mark.parametrize("width", [576, 37])
def test_rms_norm_equals_torch(width):
    g = torch.Generator().manual_seed(width)
    norm = _norm(width, width)
    x = torch.randn(19, width, generator=g) * 4
    got = norm(x)
    assert got.data_ptr() != x.data_ptr()
    torch.testing.assert_close(got, norm._norm(x), rtol=1e-6, atol=1e-5)


def test_rms_norm_with_residual_updates_both_in_place():
    g = torch.Generator().manual_seed(1)
    norm = _norm(576, 2)
    x, residual = torch.randn(7, 576, generator=g), torch.randn(7, 576, generator=g)
    expected_stream = x + residual
    expected = norm._norm(expected_stream)
    x_in, res_in = x.clone(), residual.clone()
    got, stream = norm(x_in, res_in)
    assert got.data_ptr() == x_in.data_ptr() and stream.data_ptr() == res_in.data_ptr()
    assert torch.equal(stream, expected_stream)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-5)


def test_norm_of_a_row_view():
    """A strided [T, H] view (every other row of a wider tensor) reads the right rows."""
    norm = _norm(64, 3)
    wide = torch.randn(10, 128)
    view = wide[:, 64:]
    torch.testing.assert_close(norm(view), norm._norm(view), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("width", [1536, 21])
def test_silu_and_mul_equals_torch(width):
    g = torch.Generator().manual_seed(width)
    gate_up = torch.randn(9, 2 * width, generator=g) * 8
    # Far past exp's float32 range on both sides, and exact zeros.
    gate_up[0, :6] = torch.tensor([-1000.0, -100.0, -0.0, 0.0, 100.0, 1000.0])
    gate, up = gate_up.chunk(2, dim=-1)
    got = silu_and_mul(gate_up)
    torch.testing.assert_close(got, F.silu(gate) * up, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("head_dim, rotary_dim", [(64, 64), (64, 32), (40, 40)])
def test_rotary_in_place_equals_torch(head_dim, rotary_dim):
    g = torch.Generator().manual_seed(head_dim + rotary_dim)
    rotary = RotaryEmbedding(rotary_dim, ROPE, 4096)
    T, Hq, Hk = 11, 6, 2
    # q, k and v as views of one merged projection's output, as Llama passes them.
    qkv = torch.randn(T, (Hq + 2 * Hk) * head_dim, generator=g)
    q, k, v = qkv.split([Hq * head_dim, Hk * head_dim, Hk * head_dim], dim=-1)
    q, k = q.view(T, Hq, head_dim), k.view(T, Hk, head_dim)
    positions = torch.randint(0, 4096, (T,), generator=g)
    cos, sin = rotary.cos[positions].unsqueeze(1), rotary.sin[positions].unsqueeze(1)
    want_q, want_k = rotary._rotate(q, cos, sin), rotary._rotate(k, cos, sin)
    v_before = v.clone()
    got_q, got_k = rotary(positions, q, k)
    assert got_q.data_ptr() == qkv.data_ptr()  # in place, in the merged output
    torch.testing.assert_close(got_q, want_q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_k, want_k, rtol=1e-6, atol=1e-6)
    assert torch.equal(v, v_before)


def test_rotary_outside_the_table_is_an_error():
    rotary = RotaryEmbedding(64, ROPE, 128)
    q, k = torch.randn(2, 4, 64), torch.randn(2, 2, 64)
    with pytest.raises(RuntimeError, match="outside the rotary table"):
        rotary(torch.tensor([0, 128]), q, k)


def test_interleaved_rotary_keeps_the_torch_path():
    rotary = RotaryEmbedding(64, ROPE, 128, interleaved=True)
    q, k = torch.randn(3, 4, 64), torch.randn(3, 2, 64)
    positions = torch.tensor([0, 5, 9])
    got_q, _ = rotary(positions, q, k)
    assert got_q.data_ptr() != q.data_ptr()
    cos, sin = rotary.cos[positions].unsqueeze(1), rotary.sin[positions].unsqueeze(1)
    assert torch.equal(got_q, rotary._rotate(q, cos, sin))


def test_merged_linears_equal_the_separate_ones():
    torch.manual_seed(0)
    parts = [nn.Linear(48, 32), nn.Linear(48, 16), nn.Linear(48, 16)]
    merged = merge_linears(*parts)
    x = torch.randn(5, 48)
    q, k, v = merged(x).split([32, 16, 16], dim=-1)
    for got, part in zip((q, k, v), parts, strict=True):
        torch.testing.assert_close(got, part(x), rtol=1e-6, atol=1e-6)


def test_a_loaded_llama_runs_merged_packed_projections(tmp_path):
    """What the parity tests exercise by default: one packed q/k/v and one
    packed gate/up matmul per layer."""
    from tiny_models import build_tiny_model

    from engine import LLM
    from engine.kernels.linear import Bf16Linear, PackedLinear

    llm = LLM(str(build_tiny_model("llama", tmp_path)), kv_cache_blocks=8)
    layer = llm.engine.model.model.layers[0]
    assert not hasattr(layer.self_attn, "q_proj") and not hasattr(layer.mlp, "up_proj")
    packed = (PackedLinear, Bf16Linear)  # oneDNN's, or (bf16 without AMX) the project's
    assert isinstance(layer.self_attn.qkv_proj, packed)
    assert isinstance(layer.mlp.gate_up_proj, packed)


def test_cache_write_equals_torch_scatters():
    """write_kv puts each token's K, V and position in its slot and zeroes the
    slot's score, as the four torch scatters do, from views with a row stride."""
    g = torch.Generator().manual_seed(5)
    NB, bs, H, D, T = 6, 4, 3, 8, 9
    caches = [torch.randn(NB, bs, H, D, generator=g) for _ in range(2)]
    positions_cache = torch.randint(0, 99, (NB, bs, H), generator=g, dtype=torch.int32)
    scores = torch.randn(NB, bs, H, generator=g)
    qkv = torch.randn(T, 3 * H * D, generator=g)
    k = qkv[:, H * D : 2 * H * D].view(T, H, D)
    v = qkv[:, 2 * H * D :].view(T, H, D)
    slots = torch.randperm(NB * bs, generator=g)[:T]
    positions = torch.arange(100, 100 + T)

    want = [c.clone() for c in (*caches, positions_cache, scores)]
    want[0].view(-1, H, D)[slots] = k
    want[1].view(-1, H, D)[slots] = v
    want[2].view(-1, H)[slots] = positions.to(torch.int32).unsqueeze(1)
    want[3].view(-1, H)[slots] = 0.0
    got = [c.clone() for c in (*caches, positions_cache, scores)]
    cpu_kernels.write_kv()(*got, k, v, slots, positions)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="outside the cache"):
        cpu_kernels.write_kv()(*got, k, v, slots + NB * bs, positions)
