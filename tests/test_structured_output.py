"""Structured output in the engine: a random-weight model with SmolLM2's
vocabulary must still write output that parses and validates (the grammar
alone makes it so), unconstrained rows are untouched, grammars are cached,
bad ones are refused, and matcher state goes with the request."""

import gc
import json
import re
import shutil
import weakref

import jsonschema_rs
import pytest
import torch

from engine import LLM, EngineConfig, LLMEngine, SamplingParams, StructuredOutputsParams
from engine.loading.default_model import default_model_path
from engine.runtime.structured_output import StructuredOutputStats
from engine.runtime.structured_output.masking import GrammarMasker, _add_on_cpu

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "active"],
    "additionalProperties": False,
}
PROMPT = "Describe a user as JSON:"


@pytest.fixture(scope="module")
def random_smollm_vocab(tmp_path_factory):
    """A tiny random Llama over SmolLM2's 49,152-token vocabulary and tokenizer:
    its choices are noise, so only the grammar can make its output valid."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    folder = tmp_path_factory.mktemp("random-smollm-vocab")
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        max_position_embeddings=512,
        initializer_range=0.5,  # wide logits: sampling picks all over the vocabulary
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder, safe_serialization=True)
    source = default_model_path()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def llm(random_smollm_vocab):
    return LLM(model=str(random_smollm_vocab), dtype="float32", kv_cache_bytes="16MiB")


def _sampled(n=4, max_tokens=160, **structured):
    return SamplingParams(
        n=n, temperature=1.0, seed=3, max_tokens=max_tokens, structured_outputs=structured
    )


def test_random_weights_write_json_that_validates(llm):
    out = llm.generate(PROMPT, _sampled(json=SCHEMA))[0]
    validator = jsonschema_rs.validator_for(SCHEMA)
    for choice in out.outputs:
        doc = json.loads(choice.text)
        assert validator.is_valid(doc), choice.text
        assert choice.finish_reason == "stop", choice
        # The output ends where the grammar does: no end-of-text step spent.
        assert choice.token_ids[-1] != 2
    # The four samples differ (the mask constrains, it does not decide).
    assert len({c.text for c in out.outputs}) > 1
    assert llm.engine.kv.num_used_blocks == 0


def test_random_weights_regex_choice_and_json_object(llm):
    regex = r"[A-Z][a-z]{2,6}-[0-9]{2,4}(\.[a-z]{2})?"
    for choice in llm.generate(PROMPT, _sampled(regex=regex))[0].outputs:
        assert re.fullmatch(regex, choice.text), choice.text
        assert choice.finish_reason == "stop"
    options = ["red", "green", "blue sky", 'say "hi"']
    texts = {c.text for c in llm.generate(PROMPT, _sampled(n=8, choice=options))[0].outputs}
    assert texts <= set(options) and len(texts) > 1
    # Any object: noise fills it until max_tokens, but it always opens as one.
    out = llm.generate(PROMPT, _sampled(n=1, max_tokens=8, json_object=True))[0].outputs[0]
    assert out.text.startswith("{")


def test_unconstrained_rows_are_untouched(llm):
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3)
    alone = llm.generate(PROMPT, greedy)[0].outputs[0]
    constrained = _sampled(n=1, json=SCHEMA)
    both = llm.generate([PROMPT, PROMPT], [greedy, constrained])
    assert both[0].outputs[0].token_ids == alone.token_ids
    assert both[0].outputs[0].logprobs == alone.logprobs


def test_logprobs_are_of_the_masked_distribution(llm):
    # As vLLM: the mask applies before the sampler, so a disallowed token has
    # a logprob of -inf and the allowed ones share all the probability.
    params = SamplingParams(temperature=0, max_tokens=4, logprobs=10)
    params.structured_outputs = StructuredOutputsParams(choice=["yes", "no"])
    out = llm.generate(PROMPT, params)[0].outputs[0]
    first = out.logprobs[0]
    allowed = {t: lp.logprob for t, lp in first.items() if lp.logprob > float("-inf")}
    # y, ye, yes, n, no: each a prefix of a choice, and nothing else.
    texts = _texts(llm, allowed)
    assert 2 <= len(texts) < 10 and all("yes".startswith(t) or "no".startswith(t) for t in texts)
    assert sum(torch.tensor(list(allowed.values())).exp().tolist()) == pytest.approx(1.0, abs=1e-4)
    assert out.text in ("yes", "no")


def _texts(llm, token_ids):
    return [llm.get_tokenizer().decode([t]) for t in token_ids]


def test_compiled_grammars_are_cached_by_spec(llm):
    compiler = llm.engine.structured.compiler
    schema = {"type": "object", "properties": {"k": {"enum": [1, 2]}}, "required": ["k"]}
    before = compiler.num_compiled
    llm.generate([PROMPT] * 3, _sampled(n=2, max_tokens=20, json=schema))
    llm.generate(PROMPT, _sampled(n=1, max_tokens=20, json=dict(schema)))
    assert compiler.num_compiled == before + 1


@pytest.mark.parametrize(
    "structured, message",
    [
        ({"json": {"type": "objekt"}}, "invalid JSON schema: Invalid type: objekt"),
        ({"json": '{"type": '}, "not valid JSON"),
        ({"json": {"type": "integer", "minimum": 5, "maximum": 1}}, "Unsatisfiable"),
        ({"regex": "a(b"}, "invalid regex"),
        ({"regex": "(?=a)a"}, "look-around"),
        ({"choice": []}, "non-empty list"),
        ({"grammar": "start: ("}, "invalid grammar"),
        ({"regex": "a", "choice": ["a"]}, "exactly one of"),
    ],
)
def test_bad_constraints_are_value_errors_and_the_engine_carries_on(llm, structured, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        llm.generate(PROMPT, SamplingParams(max_tokens=4, structured_outputs=structured))
    assert not llm.engine.has_unfinished_requests()
    out = llm.generate(PROMPT, _sampled(n=1, choice=["ok"]))[0].outputs[0]
    assert out.text == "ok"


def test_matcher_state_goes_with_a_finished_or_aborted_request(random_smollm_vocab):
    engine = LLMEngine(
        EngineConfig(model=str(random_smollm_vocab), dtype="float32", kv_cache_bytes="16MiB")
    )
    params = SamplingParams(max_tokens=100, structured_outputs={"json": SCHEMA})
    engine.add_request("a", PROMPT, params)
    engine.add_request("b", PROMPT, params)
    grammars = {rid: weakref.ref(engine._states[rid].grammar) for rid in ("a", "b")}
    engine.step()
    engine.step()
    engine.abort_request("a")
    while engine.has_unfinished_requests():
        engine.step()
    gc.collect()
    assert all(ref() is None for ref in grammars.values())
    assert engine.kv.num_used_blocks == 0


def test_a_bad_compile_leaves_nothing_queued(random_smollm_vocab, llm):
    # The first prompt is fine, the second's grammar fails: neither is queued.
    good, bad = _sampled(n=1, choice=["x"]), SamplingParams(structured_outputs={"regex": "("})
    with pytest.raises(ValueError):
        llm.generate([PROMPT, PROMPT], [good, bad])
    assert not llm.engine.has_unfinished_requests() and llm.engine.kv.num_used_blocks == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # numpy path, torch path
@pytest.mark.parametrize("rows", [None, [0, 2]])
def test_the_mask_matches_the_bits_and_spares_other_rows(dtype, rows):
    masker = GrammarMasker(70, StructuredOutputStats())  # 3 words, the last one partial
    bits = torch.randint(-(2**31), 2**31 - 1, (4 if rows is None else 2, 3), dtype=torch.int32)
    logits = torch.randn(4, 70, dtype=dtype)
    masked = logits.clone()
    if dtype == torch.float32:
        _add_on_cpu(masked, bits, rows)
    else:
        masker._add_on_device(masked, bits, rows)
    targets = list(range(4)) if rows is None else rows
    for r in range(4):
        if r not in targets:
            assert torch.equal(masked[r], logits[r])  # untouched, bit for bit
            continue
        word = bits[targets.index(r)]
        allowed = [(int(word[t // 32]) >> (t % 32)) & 1 for t in range(70)]
        row = logits[r].tolist()
        expected = [v if a else float("-inf") for v, a in zip(row, allowed, strict=True)]
        assert masked[r].tolist() == expected


def test_parallel_and_serial_mask_fills_agree(llm, monkeypatch):
    from engine.runtime.structured_output import masking

    so = llm.engine.structured
    grammars = [so.new_sequence(StructuredOutputsParams(json=SCHEMA)) for _ in range(3)]
    tok = llm.get_tokenizer()
    for g, text in zip(grammars, ['{"name": "A', '{"name": "Bo", "age": 1', ""], strict=True):
        for t in tok.encode(text):
            g.advance(t)
    masker = so._masker
    serial = masker._fill(grammars).clone()
    monkeypatch.setattr(masking, "PARALLEL_MIN_ROWS", 1)
    monkeypatch.setattr(masking, "PARALLEL_MIN_CPUS", 1)
    with torch.inference_mode():  # the buffer was made inside the engine's step
        masker._bits.zero_()
    assert torch.equal(masker._fill(grammars), serial)
    assert len({tuple(row.tolist()) for row in serial}) == 3  # three different states


def test_json_layout_is_json_dumps_unless_the_schema_says(llm):
    compiler, tok = llm.engine.structured.compiler, llm.get_tokenizer()
    free = {"whitespace_flexible": True, "item_separator": ",", "key_separator": ":"}

    def takes(schema, text):
        m = compiler.new_matcher(StructuredOutputsParams(json=schema))
        return m.consume_tokens(tok.encode(text)) and m.is_accepting()

    assert takes({"type": "object"}, '{"a": 1, "b": [1, 2]}')
    assert not takes({"type": "object"}, '{"a":1}')
    assert not takes({"type": "object"}, '{\n  "a": 1\n}')
    loose = {"type": "object", "x-guidance": free}
    assert takes(loose, '{"a":1}') and takes(loose, '{\n  "a": 1\n}')
