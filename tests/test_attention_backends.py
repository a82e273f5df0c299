"""Attention backends: chosen once per layer when the cache is bound, by
device, dtype, positional terms and what is installed; forced by
KEYSERVE_ATTENTION_BACKEND; and the backends agree on outputs and scores."""

import pytest
import torch
from tiny_models import build_tiny_model, load_reference, reference_greedy

from engine import LLM, SamplingParams
from engine.attention.backends import BACKEND_ENV, CpuBackend, TorchBackend
from engine.kernels import cpu as cpu_kernels

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
PROMPT = list(range(3, 40))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build_tiny_model("llama", tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def bloom(tmp_path_factory):
    return build_tiny_model("bloom", tmp_path_factory.mktemp("bloom"))


def _llm(folder, **kwargs) -> LLM:
    return LLM(model=str(folder), skip_tokenizer_init=True, dtype="float32", block_size=4, **kwargs)


def _backends(llm: LLM) -> list:
    return [a.backend for a in llm.engine.model.attention_layers()]


def test_cpu_backend_for_a_rope_model_on_cpu(llama):
    if not cpu_kernels.loaded():
        pytest.skip("the C++ kernels did not build here")
    llm = _llm(llama)
    backends = _backends(llm)
    assert [b.name for b in backends] == ["cpu", "cpu"]
    assert all(isinstance(b, CpuBackend) for b in backends)
    llm.generate([PROMPT], GREEDY)
    # Chosen once: the same objects after a generation.
    assert all(a is b for a, b in zip(backends, _backends(llm), strict=True))


def test_alibi_takes_the_torch_backend(bloom):
    llm = _llm(bloom)
    assert {b.name for b in _backends(llm)} == {"torch"}
    assert all(type(b) is TorchBackend for b in _backends(llm))


def test_environment_forces_the_torch_backend(llama, monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "torch")
    llm = _llm(llama)
    assert all(type(b) is TorchBackend for b in _backends(llm))
    out = llm.generate([PROMPT], GREEDY)[0].outputs[0].token_ids
    assert out == reference_greedy(load_reference(llama), PROMPT, 6)


@pytest.mark.parametrize(
    "value, message",
    [("tensorrt", "must be one of"), ("flashinfer", "cannot run here")],
)
def test_a_backend_that_cannot_run_is_a_clear_error(llama, monkeypatch, value, message):
    monkeypatch.setenv(BACKEND_ENV, value)
    with pytest.raises(ValueError, match=message):
        _llm(llama)


def test_forcing_cpu_for_alibi_is_refused(bloom, monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "cpu")
    with pytest.raises(ValueError, match="cannot run here"):
        _llm(bloom)


@pytest.mark.parametrize("policy", ["h2o", "keyformer"])
def test_cpu_and_torch_backends_accumulate_the_same_scores(llama, monkeypatch, policy):
    """The same prompt through both backends leaves the same score cache
    (the C++ kernels and the torch scoring compute one definition)."""
    if not cpu_kernels.loaded():
        pytest.skip("the C++ kernels did not build here")
    params = SamplingParams(
        temperature=0, max_tokens=3, ignore_eos=True, seed=7, kv_policy=policy, kv_min_tokens=0
    )
    caches = {}
    for name in ("cpu", "torch"):
        monkeypatch.setenv(BACKEND_ENV, name)
        # A budget above the prompt: nothing is evicted, every score stays.
        llm = _llm(llama, kv_ratio=1.0)
        assert _backends(llm)[0].name == name
        llm.generate([PROMPT], params)
        caches[name] = llm.engine.runner.cache.scores.clone()
    assert caches["cpu"].abs().sum() > 0
    torch.testing.assert_close(caches["cpu"], caches["torch"], rtol=1e-4, atol=1e-5)
