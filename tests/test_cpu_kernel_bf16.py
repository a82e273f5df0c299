"""The C++ decode attention and cache write in bfloat16 (engine/kernels/csrc/):
against a float32 torch reference over the same bf16-rounded inputs, the
output within bfloat16's rounding and the float32 logits within float32's;
a build without AVX-512 (so without its BF16 instructions) gives the same;
and a whole bfloat16 generation through the CPU backend agrees with the
torch backend."""

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from bf16_backends import agreeing_steps, counted_llm
from bf16_bounds import assert_bf16_close
from portable_build import PORTABLE_FLAGS, compiler_defines, run_with_flags
from tiny_models import build_tiny_model

from engine import SamplingParams
from engine.kernels import cpu as cpu_kernels

# Decode shapes: the vector code (head size 64 or 128, groups up to 8, a
# group of 7 as a pass of 4 rows and one of 3; with
# 128-token blocks, several trees of 16 keys a block and a partial one) and
# the scalar code (other head sizes, or 16 query heads per KV head).
SHAPES = [
    (9, 3, 64, 16),
    (9, 3, 64, 128),
    (8, 2, 128, 8),
    (6, 2, 128, 32),
    (14, 2, 64, 32),
    (4, 4, 32, 4),
    (6, 1, 48, 16),
    (16, 1, 64, 16),
]


@pytest.fixture(scope="module")
def ops():
    if not cpu_kernels.loaded():
        pytest.skip("no C++ compiler here: the engine runs its torch path")
    return torch.ops.keyserve


def _reference(q, k_cache, v_cache, tables, num_keys, scale):
    """float32 attention, P |V| (the error bound's scale, bf16_bounds.py)
    and logits over the (already bf16-rounded) inputs."""
    q, k_cache, v_cache = q.float(), k_cache.float(), v_cache.float()
    B, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    keys = k_cache[tables].flatten(1, 2)  # [B, L, Hkv, D]
    values = v_cache[tables].flatten(1, 2)
    L = keys.shape[1]
    valid = torch.arange(L).view(1, 1, 1, L) < num_keys.view(B, 1, 1, 1)
    out, mag = (
        F.scaled_dot_product_attention(
            q.unsqueeze(2), keys.transpose(1, 2), vals.transpose(1, 2),
            attn_mask=valid, scale=scale, enable_gqa=True,
        ).squeeze(2)
        for vals in (values, values.abs())
    )  # fmt: skip
    qs = q.view(B, Hkv, Hq // Hkv, D)
    logits = torch.einsum("bhgd,blhd->bhgl", qs, keys).reshape(B, Hq, L) * scale
    return out, mag, logits, valid.view(B, 1, L)


def _decode_inputs(num_heads, num_kv_heads, head_dim, block_size, seed):
    """bf16 q and caches, ragged lengths, shuffled block tables padded with block 0."""
    g = torch.Generator().manual_seed(seed)
    num_blocks, max_blocks = 40, 6
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=g).bfloat16()
    v_cache = torch.randn(shape, generator=g).bfloat16()
    num_keys = torch.tensor([1, block_size, max_blocks * block_size, 2 * block_size + 3])
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables = torch.zeros(len(num_keys), max_blocks, dtype=torch.long)
    for b, n in enumerate(num_keys.tolist()):
        used = -(-n // block_size)
        tables[b, :used] = torch.tensor([order.pop() for _ in range(used)])
    q = torch.randn(len(num_keys), num_heads, head_dim, generator=g).bfloat16()
    return q, k_cache, v_cache, tables, num_keys


def check_decode(ops, num_heads, num_kv_heads, head_dim, block_size):
    """The bf16 decode kernel against the float32 reference (also run by the
    portable-build test below, in a process of its own)."""
    q, k_cache, v_cache, tables, num_keys = _decode_inputs(
        num_heads, num_kv_heads, head_dim, block_size, seed=num_heads * 100 + head_dim
    )
    scale = head_dim**-0.5
    out = torch.empty_like(q)
    sentinel = 1234.5
    logits = torch.full((q.shape[0], num_heads, tables.shape[1] * block_size), sentinel)
    ops.paged_decode_attention(out, q, k_cache, v_cache, tables, num_keys, scale, logits)
    ref_out, mag, ref_logits, valid = _reference(q, k_cache, v_cache, tables, num_keys, scale)
    # The probabilities are rounded to bf16 for P V where the CPU has
    # AVX-512-BF16 (decode_tiles_bf16.h), as in the prompt kernels.
    assert_bf16_close(out, ref_out, mag)
    # Products of bf16 values are exact in float32: only the sums' order differs.
    valid = valid.expand_as(logits)
    torch.testing.assert_close(logits[valid], ref_logits[valid], rtol=1e-5, atol=2e-5)
    assert (logits[~valid] == sentinel).all()  # padding slots untouched
    again = torch.empty_like(q)
    ops.paged_decode_attention(again, q, k_cache, v_cache, tables, num_keys, scale,
                               torch.empty(0))  # fmt: skip
    assert torch.equal(again, out)
    # One sequence: work splits by KV head.
    for b in range(q.shape[0]):
        one = torch.empty_like(q[b : b + 1])
        ops.paged_decode_attention(one, q[b : b + 1], k_cache, v_cache, tables[b : b + 1],
                                   num_keys[b : b + 1], scale, torch.empty(0))  # fmt: skip
        assert torch.equal(one, out[b : b + 1])
    # q read in place from a wider row, as a slice of the fused QKV projection.
    wide = torch.cat([q.flatten(1), torch.zeros(q.shape[0], 2 * head_dim, dtype=q.dtype)], 1)
    sliced = wide[:, : num_heads * head_dim].view_as(q)
    ops.paged_decode_attention(again, sliced, k_cache, v_cache, tables, num_keys, scale,
                               torch.empty(0))  # fmt: skip
    assert torch.equal(again, out)


def check_write(ops):
    """write_kv into bf16 caches equals torch's four scatters, bit for bit,
    from K/V views with a row stride (a merged QKV projection)."""
    g = torch.Generator().manual_seed(5)
    NB, bs, H, D, T = 6, 4, 3, 64, 9
    caches = [torch.randn(NB, bs, H, D, generator=g).bfloat16() for _ in range(2)]
    positions_cache = torch.randint(0, 99, (NB, bs, H), generator=g, dtype=torch.int32)
    scores = torch.randn(NB, bs, H, generator=g)
    qkv = torch.randn(T, 3 * H * D, generator=g).bfloat16()
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
    ops.write_kv(*got, k, v, slots, positions)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="cache's dtype"):
        ops.write_kv(*got, k.float(), v.float(), slots, positions)


@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim, block_size", SHAPES)
def test_bf16_decode_equals_float32_reference(ops, num_heads, num_kv_heads, head_dim, block_size):
    check_decode(ops, num_heads, num_kv_heads, head_dim, block_size)


def test_bf16_cache_write_equals_torch_scatters(ops):
    check_write(ops)


def test_bf16_decode_refuses_mixed_dtypes(ops):
    q, k_cache, v_cache, tables, num_keys = _decode_inputs(4, 2, 64, 16, seed=1)
    with pytest.raises(RuntimeError, match="one dtype"):
        ops.paged_decode_attention(torch.empty_like(q), q, k_cache.float(), v_cache.float(),
                                   tables, num_keys, 0.125, torch.empty(0))  # fmt: skip
    logits = torch.empty(q.shape[0], 4, 96, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="logits_out must be contiguous float32"):
        ops.paged_decode_attention(torch.empty_like(q), q, k_cache, v_cache, tables, num_keys,
                                   0.125, logits)  # fmt: skip


PORTABLE_SOURCES = ("paged_attention_cpu.cpp", "kv_write_cpu.cpp")
PORTABLE_CHECK = """
import test_cpu_kernel_bf16 as t
for shape in t.SHAPES:
    t.check_decode(torch.ops.keyserve, *shape)
t.check_write(torch.ops.keyserve)
print("portable bf16 kernels agree")
"""


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86 instruction-set flags")
def test_a_build_without_avx512_bf16_gives_the_same(ops):
    """The kernels built as for an x86 CPU without AVX-512 (the widening
    loads instead of VDPBF16PS, 16 lanes lowered to AVX2) pass the same
    checks, in a process of its own (one library per process)."""
    assert "__AVX512BF16__" not in compiler_defines(PORTABLE_FLAGS.split())
    result = run_with_flags(PORTABLE_SOURCES, PORTABLE_CHECK)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "portable bf16 kernels agree" in result.stdout


PROMPTS = [list(range(3, 40)), list(range(60, 77)), [7, 9, 11]]


def _generate(folder: Path, backend: str, params: SamplingParams, monkeypatch):
    """(outputs, op calls) of PROMPTS in bfloat16 through `backend`."""
    llm, counts = counted_llm(folder, backend, monkeypatch, kv_cache_blocks=64, kv_ratio=1.0)
    return [o.outputs[0] for o in llm.generate(PROMPTS, params)], counts


@pytest.mark.parametrize("family", ["llama-head-64", "llama"])
@pytest.mark.parametrize("policy", ["full", "h2o"])
def test_bf16_generation_matches_the_torch_backend(ops, family, policy, tmp_path, monkeypatch):
    """A whole bfloat16 generation through the CPU backend (the C++ write and
    decode, with the decode's logits scoring h2o) gives the torch backend's
    greedy tokens and nearly their log-probabilities. Head size 64 takes
    the vector code, the plain llama's 16 the scalar code."""
    folder = build_tiny_model(family, tmp_path / family)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2,
                            kv_policy=policy, kv_min_tokens=0)  # fmt: skip
    outs, counts = _generate(folder, "cpu", params, monkeypatch)
    ref_outs, _ = _generate(folder, "torch", params, monkeypatch)
    for got, want in zip(outs, ref_outs, strict=True):
        agreeing_steps(got, want)
    # 11 decode steps of 2 layers each ran the C++ decode, every step wrote in one op.
    assert counts["paged_decode_attention"] == 2 * 11
    assert counts["write_kv"] >= 2 * 12
    assert ("add_decode_scores" in counts) == (policy == "h2o")
