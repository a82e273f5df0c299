"""Greedy parity with transformers on the real SmolLM2-135M-Instruct weights."""

import pytest
import torch

from engine import LLM, SamplingParams
from engine.loading.default_model import default_model_path

PROMPTS = [
    "The history of the Roman Empire",
    "def fibonacci(n):\n    ",
    "Q: Why is the sky blue?\nA:",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
]
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def llm():
    # full: transformers keeps every token (the default policy, keyformer, would evict).
    # float32 whatever `auto` picks on this CPU: the reference is transformers in float32.
    return LLM(
        max_num_batched_tokens=64, kv_cache_bytes="256MiB", kv_policy="full", dtype="float32"
    )


@pytest.fixture(scope="module")
def hf_greedy(llm):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(default_model_path(), dtype=torch.float32)
    # Generate past EOS as the engine does with ignore_eos (no EOS masking).
    model.generation_config.eos_token_id = None
    tok = llm.get_tokenizer()
    expected = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([tok.encode(prompt)])
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
            )
            expected.append(out[0, ids.shape[1] :].tolist())
    return expected


@pytest.fixture(scope="module")
def engine_outputs(llm):
    # A small token budget chunks the prompts and staggers the batch.
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate(PROMPTS, params)
    assert llm.engine.kv.num_used_blocks == 0
    return [o.outputs[0] for o in outs]


def test_batched_greedy_equals_transformers(engine_outputs, hf_greedy):
    for out, expected in zip(engine_outputs, hf_greedy, strict=True):
        assert out.token_ids == expected
        assert out.finish_reason == "length"


def test_text_matches_tokenizer_decode(llm, engine_outputs, hf_greedy):
    for out, expected in zip(engine_outputs, hf_greedy, strict=True):
        assert out.text == llm.get_tokenizer().decode(expected)
