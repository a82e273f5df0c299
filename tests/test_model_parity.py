"""Greedy parity with transformers for every model family, on tiny random models.

Each family's checkpoint is built once; transformers' `generate` (batch of
one, no padding) gives the expected tokens, and the engine must reproduce them
token for token however it batches, chunks, joins and preempts.
"""

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tiny_models import FAMILIES, VOCAB, build_tiny_model, load_reference, reference_greedy

from engine import LLM, SamplingParams
from engine.attention.backends import BACKEND_ENV
from engine.models.base import CausalLM

NEW_TOKENS = 20
PROMPT_LENGTHS = (5, 17, 40)
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


PROMPTS = _prompts()


@dataclass
class Family:
    name: str
    folder: Path
    expected: list[list[int]]  # transformers' greedy tokens, one list per prompt


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Family:
    name = request.param
    folder = build_tiny_model(name, tmp_path_factory.mktemp(name))
    reference = load_reference(folder)
    expected = [reference_greedy(reference, p, NEW_TOKENS) for p in PROMPTS]
    return Family(name, folder, expected)


def _llm(family: Family, **kwargs: object) -> LLM:
    # full: the oracle keeps every token (the default policy, keyformer, would evict).
    kwargs = {"block_size": 4, "kv_cache_blocks": 64, "kv_policy": "full", **kwargs}
    # float32 everywhere: "auto" would pick bfloat16 on a GPU, and the oracle is float32.
    return LLM(model=str(family.folder), skip_tokenizer_init=True, dtype="float32", **kwargs)


def _check(llm: LLM, family: Family, outputs: list[list[int]]) -> None:
    for prompt, got, expected in zip(PROMPTS, outputs, family.expected, strict=True):
        assert got == expected, f"{family.name}, prompt of {len(prompt)} tokens"
    # Every block went back to the pool when its request finished.
    assert llm.engine.kv.num_used_blocks == 0


def test_batch_equals_transformers(family: Family) -> None:
    llm = _llm(family)
    outs = llm.generate(PROMPTS, GREEDY)
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    _check(llm, family, [o.outputs[0].token_ids for o in outs])


def test_chunked_prefill(family: Family) -> None:
    # 8 tokens a step: the 17- and 40-token prompts prefill over several steps,
    # each chunk reading the K/V its earlier chunks cached.
    llm = _llm(family, max_num_batched_tokens=8)
    outs = llm.generate(PROMPTS, GREEDY)
    _check(llm, family, [o.outputs[0].token_ids for o in outs])


def test_requests_join_running_batch(family: Family) -> None:
    llm = _llm(family)
    engine = llm.engine
    engine.add_request("0", PROMPTS[0], GREEDY)
    for _ in range(3):
        engine.step()
    # The others arrive while request 0 decodes: their prefills share its steps.
    for i, prompt in enumerate(PROMPTS[1:], start=1):
        engine.add_request(str(i), prompt, GREEDY)
    finished: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0].token_ids
    _check(llm, family, [finished[str(i)] for i in range(len(PROMPTS))])


def test_preemption_recomputes_exactly(family: Family) -> None:
    # 16 blocks of 4 slots, longest prompt first: it takes 10 blocks and the
    # 17-token prompt 5, so its first decodes use up the pool and the newer
    # request is preempted, then recomputed from its tokens so far.
    llm = _llm(family, kv_cache_blocks=16)
    outs = llm.generate(PROMPTS[::-1], GREEDY)[::-1]
    assert llm.engine.scheduler.num_preemptions > 0
    _check(llm, family, [o.outputs[0].token_ids for o in outs])


def test_torch_backend_without_the_cpu_kernels(
    family: Family, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The plain-torch attention backend (gather + SDPA) that runs where the
    C++ kernels cannot be built, or on other devices, gives the same tokens."""
    monkeypatch.setenv(BACKEND_ENV, "torch")
    llm = _llm(family)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY)
    _check(llm, family, [o.outputs[0].token_ids for o in outs])


def test_separate_projections_and_torch_layer_ops(
    family: Family, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model as built from the checkpoint's names (q/k/v and gate/up not
    merged) on the torch norm, RoPE and SwiGLU: the path of a model built but
    not merged, and of devices without the C++ ops."""
    monkeypatch.setattr("engine.models.common.layer_ops_loaded", lambda: False)
    monkeypatch.setattr(CausalLM, "merge_projections", lambda self: None)
    llm = _llm(family)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY)
    _check(llm, family, [o.outputs[0].token_ids for o in outs])
