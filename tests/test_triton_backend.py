"""The Triton backend end to end, in Triton's interpreter on the CPU: whole
generations against transformers and against the dense eviction reference.
On a CUDA machine, `TRITON_INTERPRET=0 pytest tests/test_triton_*.py` runs the
same on the GPU."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="Triton is not installed (the test extra has it)")

from test_eviction_parity import check_mixed_policy_batch  # noqa: E402
from tiny_models import build_tiny_model, load_reference, reference_greedy  # noqa: E402

from engine import LLM, SamplingParams  # noqa: E402
from engine.attention.backends import BACKEND_ENV  # noqa: E402

DEVICE = "cpu" if os.environ["TRITON_INTERPRET"] == "1" else "cuda"


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "triton")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_model("llama", tmp_path_factory.mktemp("llama"))


def _llm(folder, **kwargs) -> LLM:
    return LLM(
        model=str(folder), skip_tokenizer_init=True, dtype="float32", device=DEVICE,
        block_size=4, **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize("enforce_eager", [False, True])
def test_generation_equals_transformers(triton_backend, folder, enforce_eager):
    """Decode steps through the graph buffers (padded to a bucket), or eagerly."""
    llm = _llm(
        folder, kv_cache_blocks=64, max_num_batched_tokens=8, kv_policy="full",
        enforce_eager=enforce_eager,
    )  # fmt: skip
    assert {a.backend.name for a in llm.engine.model.attention_layers()} == {"triton"}
    assert (llm.engine.runner.graphs is None) == enforce_eager
    reference = load_reference(folder)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (3, 17, 30)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.outputs[0].token_ids == reference_greedy(reference, prompt, 8)
    assert llm.engine.kv.num_used_blocks == 0


def test_evicting_policies_equal_the_dense_reference(triton_backend, folder):
    """Decode scores added by the kernel, keyformer's noise included, choose
    exactly the keys the dense reference chooses."""
    llm = _llm(folder, kv_cache_blocks=256, max_num_batched_tokens=24)
    check_mixed_policy_batch(llm)
    assert llm.engine.stats()["tokens_evicted"] > 0


def test_padded_rows_touch_only_the_scratch_block(triton_backend, folder):
    """Three decodes run in a bucket of four: the fourth row's K/V go to the
    scratch block past the pool, and no block the pool never handed out."""
    llm = _llm(folder, kv_cache_blocks=32, kv_policy="full")
    prompts = [[5, 6, 7], [8, 9, 10, 11], [12, 13]]
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    k = llm.engine.runner.cache.k  # [L, 33, block_size, Hkv, D]: block 32 is scratch
    touched = [b for b in range(k.shape[1]) if k[:, b].abs().sum() > 0]
    # Prompts of 3, 4, 2 tokens plus 4 outputs: 2 + 2 + 2 blocks from the front.
    assert touched == [0, 1, 2, 3, 4, 5, 32]
