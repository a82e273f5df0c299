"""The CUDA paged-attention path (engine/attention/flashinfer.py).

On CPU, a stand-in with FlashInfer's documented contract (fake_flashinfer)
takes the real module's place, so the page tables and plans the engine builds
are checked by whole generations against transformers and the dense
eviction reference. On a CUDA machine with FlashInfer installed, the real
kernels are held to a float32 reference over the same page tables.
"""

import sys

import fake_flashinfer
import pytest
import torch
from test_eviction_parity import check_mixed_policy_batch
from tiny_models import build_tiny_model, load_reference, reference_greedy

from engine import LLM, SamplingParams
from engine.attention import flashinfer as flashinfer_attention
from engine.attention.backends import FlashInferBackend


@pytest.fixture
def stand_in(monkeypatch):
    """FlashInfer's stand-in, allowed on CPU, in float32, for the tiny models' head size."""
    monkeypatch.setitem(sys.modules, "flashinfer", fake_flashinfer)
    monkeypatch.setattr(flashinfer_attention, "DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(flashinfer_attention, "DTYPES", (torch.float32,))
    monkeypatch.setattr(flashinfer_attention, "HEAD_DIMS", (16,))
    monkeypatch.setattr(flashinfer_attention, "WORKSPACE_BYTES", 16)
    monkeypatch.setattr(flashinfer_attention, "_wrappers", {})
    monkeypatch.setattr(flashinfer_attention, "_failed", [])
    monkeypatch.delenv(flashinfer_attention.DISABLE_ENV, raising=False)
    flashinfer_attention._flashinfer.cache_clear()
    fake_flashinfer.runs.update(decode=0, prefill=0)
    yield fake_flashinfer.runs
    flashinfer_attention._flashinfer.cache_clear()


def test_page_table_is_flashinfers_csr():
    tables = torch.tensor([[5, 7, 9], [3, 0, 0], [4, 6, 0]])
    num_keys = torch.tensor([33, 4, 32])
    indptr, indices, last = flashinfer_attention.page_table(tables, num_keys, block_size=16)
    assert indptr.tolist() == [0, 3, 4, 6]
    assert indices.tolist() == [5, 7, 9, 3, 4, 6]
    assert last.tolist() == [1, 4, 16]
    assert {indptr.dtype, indices.dtype, last.dtype} == {torch.int32}


def test_not_used_on_cpu_or_when_disabled(monkeypatch):
    q = torch.zeros(1, 4, 64)
    assert not flashinfer_attention.available(q, 64)  # CPU, float32
    monkeypatch.setitem(sys.modules, "flashinfer", fake_flashinfer)
    monkeypatch.setattr(flashinfer_attention, "DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(flashinfer_attention, "DTYPES", (torch.float32,))
    flashinfer_attention._flashinfer.cache_clear()
    try:
        assert flashinfer_attention.available(q, 64)
        assert not flashinfer_attention.available(q, 80)  # a head size it does not build
        monkeypatch.setenv(flashinfer_attention.DISABLE_ENV, "1")
        flashinfer_attention._flashinfer.cache_clear()
        assert not flashinfer_attention.available(q, 64)
    finally:
        flashinfer_attention._flashinfer.cache_clear()


def test_generation_through_flashinfer_equals_transformers(stand_in, tmp_path):
    folder = build_tiny_model("llama", tmp_path)
    reference = load_reference(folder)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 19, 40)]
    # 8 tokens a step: the longer prompts prefill in chunks that read the cache.
    llm = LLM(
        model=str(folder), skip_tokenizer_init=True, dtype="float32",
        block_size=4, kv_cache_blocks=64, max_num_batched_tokens=8, kv_policy="full",
    )  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.outputs[0].token_ids == reference_greedy(reference, prompt, 12)
    assert stand_in["decode"] > 0 and stand_in["prefill"] > 0
    assert llm.engine.kv.num_used_blocks == 0


def test_a_failed_plan_falls_back_to_torch_attention(stand_in, tmp_path, monkeypatch, caplog):
    # E.g. a kernel FlashInfer would JIT-compile, in an image without nvcc.
    def refuse(self, *args, **kwargs):
        raise RuntimeError("Could not find nvcc")

    monkeypatch.setattr(fake_flashinfer.BatchDecodeWithPagedKVCacheWrapper, "plan", refuse)
    folder = build_tiny_model("llama", tmp_path)
    reference = load_reference(folder)
    llm = LLM(
        model=str(folder), skip_tokenizer_init=True, dtype="float32", block_size=4,
        kv_policy="full",
    )  # fmt: skip
    prompt = list(range(3, 30))
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert out[0].outputs[0].token_ids == reference_greedy(reference, prompt, 8)
    assert "Could not find nvcc" in caplog.text
    assert not flashinfer_attention.available(torch.zeros(1, 4, 16), 16)
    assert stand_in["decode"] == 0


def test_evicting_policies_through_flashinfer_equal_dense_reference(stand_in, tmp_path):
    # Scores come from keys read apart (FlashInfer returns no logits); the
    # evicted, compacted caches must still read right through the page table.
    folder = build_tiny_model("llama", tmp_path)
    llm = LLM(
        model=str(folder), skip_tokenizer_init=True, dtype="float32",
        block_size=4, kv_cache_blocks=256, max_num_batched_tokens=24,
    )  # fmt: skip
    check_mixed_policy_batch(llm)
    assert stand_in["decode"] > 0 and stand_in["prefill"] > 0


def _real_flashinfer() -> bool:
    try:
        import flashinfer  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def _reference_attention(q, k_cache, v_cache, table, num_keys, causal):
    """float32 attention of q [m, Hq, D] over the first num_keys slots of table."""
    _, _, hkv, d = k_cache.shape
    k = k_cache[table].reshape(-1, hkv, d)[:num_keys].float()
    v = v_cache[table].reshape(-1, hkv, d)[:num_keys].float()
    group = q.shape[1] // hkv
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    logits = torch.einsum("mhd,nhd->hmn", q.float(), k) * d**-0.5
    if causal:
        m = q.shape[0]
        i = torch.arange(m, device=q.device).view(m, 1)
        j = torch.arange(num_keys, device=q.device).view(1, -1)
        logits = logits.masked_fill(j > num_keys - m + i, float("-inf"))
    return torch.einsum("hmn,nhd->mhd", logits.softmax(-1), v)


@pytest.mark.skipif(not _real_flashinfer(), reason="needs CUDA and FlashInfer")
def test_real_kernels_match_reference():
    dev, dtype, bs, shape = torch.device("cuda"), torch.bfloat16, 16, (9, 3, 64)
    hq, hkv, d = shape
    g = torch.Generator(device=dev).manual_seed(0)
    k_cache = torch.randn(64, bs, hkv, d, device=dev, dtype=dtype, generator=g)
    v_cache = torch.randn(64, bs, hkv, d, device=dev, dtype=dtype, generator=g)
    tables = torch.tensor([[3, 9, 1, 0], [7, 0, 0, 0], [2, 5, 8, 11]], device=dev)
    num_keys = torch.tensor([40, 9, 64], device=dev)
    q = torch.randn(3, hq, d, device=dev, dtype=dtype, generator=g)
    wrapper = flashinfer_attention.plan_decode(tables, num_keys, bs, shape, d**-0.5, dtype)
    out = wrapper.run(q, (k_cache, v_cache))
    for b in range(3):
        n = int(num_keys[b])
        ref = _reference_attention(q[b : b + 1], k_cache, v_cache, tables[b], n, False)
        torch.testing.assert_close(out[b : b + 1].float(), ref, atol=2e-2, rtol=2e-2)
    qp = torch.randn(20, hq, d, device=dev, dtype=dtype, generator=g)
    wrapper = flashinfer_attention.plan_prefill(0, tables[2], 20, 60, bs, shape, d**-0.5, dtype)
    out = wrapper.run(qp, (k_cache, v_cache))
    ref = _reference_attention(qp, k_cache, v_cache, tables[2], 60, True)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_scored_steps_go_whole_to_a_one_pass_backend(stand_in, tmp_path, monkeypatch):
    """Over a backend that attends and scores in one pass (Triton, CUDA's
    default), FlashInfer serves full attention only: steps that score keys go
    whole to that backend. Here the C++ backend stands in for Triton (its
    kernels score in one pass too); the routing, not the kernel, is tested."""
    folder = build_tiny_model("llama", tmp_path)
    llm = LLM(
        model=str(folder), skip_tokenizer_init=True, dtype="float32",
        block_size=4, kv_cache_blocks=256, max_num_batched_tokens=24,
    )  # fmt: skip
    layers = llm.engine.model.attention_layers()
    assert all(isinstance(a.backend, FlashInferBackend) for a in layers)
    for attn in layers:
        attn.backend.fallback.name = "triton"
    prompt = list(range(3, 30))
    full = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, kv_policy="full")
    out = llm.generate([prompt], full)[0].outputs[0].token_ids
    assert out == reference_greedy(load_reference(folder), prompt, 6)
    assert stand_in["decode"] > 0
    seen = []  # per decode call: (it had scoring rows, FlashInfer ran it)
    decode = FlashInferBackend.decode

    def spy(self, q, batch, ctx):
        before = stand_in["decode"]
        out = decode(self, q, batch, ctx)
        seen.append((batch.scoring is not None, stand_in["decode"] > before))
        return out

    monkeypatch.setattr(FlashInferBackend, "decode", spy)
    check_mixed_policy_batch(llm)
    assert any(scored for scored, _ in seen) and any(ran for _, ran in seen)
    assert not any(scored and ran for scored, ran in seen)
