"""The offline API on the real default model: sampling features, bad input,
a pool too small for everything at once, aborts; the pool is whole after each."""

import json
from dataclasses import replace

import pytest

from engine import LLM, SamplingParams
from engine.models import UnsupportedArchitectureError

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    # full: these tests compare tokens across batches and pools, not eviction.
    # float32: bfloat16's rounding flips near-tie tokens with the batch, and
    # the context capped by the 64 MiB pool is float32's.
    return LLM(kv_cache_bytes="64MiB", kv_policy="full", dtype="float32")


@pytest.fixture(autouse=True)
def _pool_is_whole_after(request):
    yield
    if "llm" in request.fixturenames:
        engine = request.getfixturevalue("llm").engine
        assert not engine.has_unfinished_requests()
        assert engine.kv.num_used_blocks == 0


def _text(llm, prompt, params):
    return llm.generate(prompt, params)[0].outputs[0]


def test_token_id_prompt_equals_text_prompt(llm):
    ids = llm.get_tokenizer().encode("The capital of France is")
    a = _text(llm, "The capital of France is", GREEDY)
    b = _text(llm, ids, GREEDY)
    assert a.token_ids == b.token_ids and a.text == b.text
    # vLLM's dict forms: TokensPrompt and TextPrompt.
    c = _text(llm, {"prompt_token_ids": ids}, GREEDY)
    d = _text(llm, {"prompt": "The capital of France is"}, GREEDY)
    assert c.token_ids == d.token_ids == a.token_ids
    with pytest.raises(ValueError, match="prompt_token_ids"):
        llm.generate({"text": "hi"}, GREEDY)


def test_seeded_sampling_is_reproducible_whatever_the_batch(llm):
    params = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=16, seed=1234)
    alone = _text(llm, "Tell me a story:", params)
    others = SamplingParams(temperature=1.2, max_tokens=20, seed=7)
    batch = llm.generate(["Hello", "Tell me a story:", "Numbers: 1, 2,"], [others, params, others])
    assert batch[1].outputs[0].token_ids == alone.token_ids
    different = _text(
        llm, "Tell me a story:", SamplingParams(temperature=1.0, max_tokens=16, seed=99)
    )
    assert different.token_ids != alone.token_ids


def test_n_completions_have_their_own_streams(llm):
    out = llm.generate("Name a colour:", SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=5))
    completions = out[0].outputs
    assert [c.index for c in completions] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in completions}) > 1


def test_stop_string_cuts_text_and_reports_reason(llm):
    free = _text(llm, "Count: 1, 2, 3,", SamplingParams(temperature=0, max_tokens=20))
    assert " 5" in free.text
    out = _text(llm, "Count: 1, 2, 3,", SamplingParams(temperature=0, max_tokens=20, stop=[" 5"]))
    assert out.finish_reason == "stop" and out.stop_reason == " 5"
    assert out.text == free.text[: free.text.index(" 5")]
    kept = _text(
        llm,
        "Count: 1, 2, 3,",
        SamplingParams(temperature=0, max_tokens=20, stop=[" 5"], include_stop_str_in_output=True),
    )
    assert kept.text == free.text[: free.text.index(" 5") + 2]


def test_stop_token_id_and_eos(llm):
    free = _text(llm, "Count: 1, 2, 3,", SamplingParams(temperature=0, max_tokens=10))
    # The first token not seen earlier in the output, past the first.
    at = next(i for i, t in enumerate(free.token_ids) if i > 0 and t not in free.token_ids[:i])
    stop_id = free.token_ids[at]
    out = _text(
        llm,
        "Count: 1, 2, 3,",
        SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_id]),
    )
    assert out.token_ids == free.token_ids[: at + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop_id)
    tok = llm.get_tokenizer()
    chat = tok.apply_chat_template([{"role": "user", "content": "Say hi."}])
    eos = _text(llm, chat, SamplingParams(temperature=0, max_tokens=64))
    assert eos.finish_reason == "stop" and eos.stop_reason is None
    assert eos.token_ids[-1] == tok.eos_token_id


def test_logprobs_top_n(llm):
    out = _text(llm, "The sky is", SamplingParams(temperature=0, max_tokens=4, logprobs=3))
    assert len(out.logprobs) == 4
    for token_id, step in zip(out.token_ids, out.logprobs, strict=True):
        assert step[token_id].rank == 1  # greedy picks the most likely token
        assert len(step) == 3
        values = sorted((lp.logprob for lp in step.values()), reverse=True)
        assert values[0] <= 0.0 and all(v is not None for v in values)
    assert out.cumulative_logprob == pytest.approx(
        sum(s[t].logprob for t, s in zip(out.token_ids, out.logprobs, strict=True))
    )


@pytest.mark.parametrize(
    "prompt, params, message",
    [
        ("", GREEDY, "empty"),
        ([], GREEDY, "empty"),
        ("word " * 9000, GREEDY, "context"),
        ("Hi", SamplingParams(temperature=0, max_tokens=8192), "exceeds the model.s context"),
        ([1, 2, 10**9], GREEDY, r"prompt: token id 1000000000 is out of vocabulary"),
        ([-4, 2, 10**9, -4], GREEDY, r"prompt: token ids -4, 1000000000 are out of vocabulary"),
    ],
)
def test_bad_input_is_a_clear_error_and_the_engine_keeps_serving(llm, prompt, params, message):
    with pytest.raises(ValueError, match=message):
        llm.generate(["Fine prompt", prompt], params)
    # Nothing of the rejected batch stays queued, and the engine still serves.
    assert not llm.engine.has_unfinished_requests()
    assert _text(llm, "The capital of France is", GREEDY).token_ids


def test_the_context_is_the_models_and_the_pool_refuses_per_request(llm):
    # 64 MiB of float32 SmolLM2 KV holds far fewer than its 8192 positions: the
    # context stays the model's (an evicting sequence holds only its budget plus
    # a prefill chunk), and a full request past the pool is refused alone.
    pool = llm.engine.kv.num_total_blocks * 16
    assert llm.engine.max_model_len == 8192 > pool
    with pytest.raises(ValueError, match=r"^prompt \(3 tokens\) plus max_tokens .*pool has"):
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=pool, kv_policy="full"))
    assert not llm.engine.has_unfinished_requests()


def test_negative_max_tokens_is_rejected():
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=-1)


def test_unknown_architecture_is_named(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "llama", "architectures": ["FooForCausalLM"]})
    )
    with pytest.raises(UnsupportedArchitectureError, match="FooForCausalLM"):
        LLM(model=str(tmp_path))


def test_missing_model_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no hub downloads"):
        LLM(model=str(tmp_path / "nowhere"))


def test_small_pool_completes_everything_in_fcfs_order(llm):
    """A pool that holds about one request: all finish, in arrival order, with
    the tokens each gives when run alone."""
    prompts = [f"Fact number {i}: the" for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    alone = [_text(llm, p, params).token_ids for p in prompts]
    small = LLM(kv_cache_blocks=3, block_size=8, kv_policy="full", dtype="float32")
    engine = small.engine
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    finish_order, results = [], {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finish_order.append(out.request_id)
                results[out.request_id] = out.outputs[0].token_ids
    assert finish_order == [str(i) for i in range(4)]
    assert [results[str(i)] for i in range(4)] == alone
    assert engine.scheduler.num_preemptions > 0
    assert engine.kv.num_used_blocks == 0


def test_abort_frees_blocks_at_any_time(llm):
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    for i in range(3):
        engine.add_request(f"a{i}", "A long story begins here and", params)
    engine.step()
    engine.step()
    assert engine.kv.num_used_blocks > 0
    out = engine.abort_request("a1")
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert engine.abort_request("a1") is None  # second abort is a no-op
    engine.abort_request("a0")
    engine.abort_request("a2")
    assert engine.kv.num_used_blocks == 0


def test_stop_strings_wait_for_min_tokens(llm):
    free = _text(llm, "Count: 1, 2, 3,", SamplingParams(temperature=0, max_tokens=20))
    first = free.text.index(",")
    out = _text(
        llm,
        "Count: 1, 2, 3,",
        SamplingParams(temperature=0, max_tokens=20, stop=[","], min_tokens=6),
    )
    assert out.finish_reason == "stop"
    assert len(out.text) > first  # the early comma did not stop it
    assert len(out.token_ids) > 6


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"stop_token_ids": [10**7]}, "stop_token_ids: token id 10000000 is out of vocabulary"),
        ({"logit_bias": {49152: 5.0}}, "logit_bias: token id 49152 is out of vocabulary"),
        ({"logit_bias": {3: 1.0, -1: 5.0}}, "logit_bias: token id -1 is out of vocabulary"),
        ({"kv_policy": "lru"}, "kv_policy"),
        ({"kv_policy": "keyformer", "kv_ratio": 1.5}, "kv_ratio"),
        ({"kv_policy": "h2o", "recent_ratio": -0.1}, "recent_ratio"),
        ({"kv_policy": "keyformer", "tau_init": 0.0}, "tau_init"),
        ({"kv_policy": "keyformer", "kv_max_tokens": 0}, "kv_max_tokens"),
        ({"kv_policy": "streaming", "sink_tokens": -1}, "sink_tokens"),
    ],
)
def test_bad_request_settings_are_named(llm, kwargs, message):
    # A bad KV value is refused as the params are built (KVPolicySettings's
    # own check), a bad token id when the engine sees the vocabulary.
    with pytest.raises(ValueError, match=message):
        llm.generate("Hello", SamplingParams(**kwargs))


def test_out_of_vocabulary_names_at_most_ten_ids(llm):
    with pytest.raises(ValueError, match=r"token ids 50000, .*, 50009 \(and 5 more\) are out"):
        llm.generate([list(range(50000, 50015))], GREEDY)


def test_logit_bias_steers_the_tokens(llm):
    plain = _text(llm, "The capital of France is", GREEDY)
    # -100 bans the greedy first token: another comes instead.
    first = plain.token_ids[0]
    banned = _text(llm, "The capital of France is", replace(GREEDY, logit_bias={first: -100}))
    assert banned.token_ids[0] != first
    assert first not in banned.token_ids
    # +100 all but forces a token, sampled or greedy.
    forced_id = llm.get_tokenizer().encode(" banana")[0]
    for params in (GREEDY, SamplingParams(temperature=1.0, max_tokens=5, seed=3)):
        forced = _text(
            llm, "The capital of France is", replace(params, logit_bias={forced_id: 100})
        )
        assert set(forced.token_ids) == {forced_id}


def test_prompt_logprobs_are_decoded_and_match_generation(llm):
    tok = llm.get_tokenizer()
    ids = tok.encode("The capital of France is Paris")
    out = llm.generate([ids], replace(GREEDY, max_tokens=2, prompt_logprobs=2))[0]
    assert len(out.prompt_logprobs) == len(ids) and out.prompt_logprobs[0] is None
    for token_id, entry in zip(ids[1:], out.prompt_logprobs[1:], strict=True):
        assert token_id in entry and len(entry) in (2, 3)
        assert all(lp.decoded_token == tok.decode([t]) for t, lp in entry.items())
    # The prompt's last token's logprob is the one a run that stops before it samples.
    head = llm.generate([ids[:-1]], replace(GREEDY, max_tokens=1, logprobs=20))[0].outputs[0]
    assert head.logprobs[0][ids[-1]].logprob == pytest.approx(
        out.prompt_logprobs[-1][ids[-1]].logprob, abs=1e-4
    )
    # n > 1: every completion's request scored the same prompt.
    n2 = llm.generate([ids], replace(GREEDY, n=2, max_tokens=1, prompt_logprobs=0))[0]
    assert [e and set(e) for e in n2.prompt_logprobs] == [None] + [{t} for t in ids[1:]]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from tiny_models import build_tiny_model

    return str(build_tiny_model("llama", tmp_path_factory.mktemp("llama")))


def _tiny_llm(folder, **kwargs):
    # kv_min_tokens 0: a 40-token prompt is past the budget (else 128 tokens).
    return LLM(
        folder, skip_tokenizer_init=True, dtype="float32", block_size=4, kv_cache_blocks=64,
        kv_min_tokens=0, **kwargs,
    )  # fmt: skip


PROMPT_40 = list(range(3, 43))
SHORT = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, seed=0)


def test_offline_default_policy_is_keyformer_at_half(tiny_llama):
    """LLM() runs the one default policy, KVPolicySettings's: a request that
    sets no KV field is cut to half its prompt by Keyformer."""
    llm = _tiny_llm(tiny_llama)
    default = llm.engine.config.kv_policy_settings()
    assert (default.kv_policy, default.kv_ratio) == ("keyformer", 0.5)
    out = llm.generate(PROMPT_40, SHORT)[0].outputs[0]
    assert len(out.token_ids) == 4
    # 40 prompt tokens, budget 20: 20 evicted after the prompt, one per new token after.
    assert llm.engine.stats()["tokens_evicted"] >= 20


def test_full_is_chosen_per_engine_or_per_request(tiny_llama):
    """kv_policy="full" keeps every token, as the engine's default or per request."""
    full_engine = _tiny_llm(tiny_llama, kv_policy="full")
    full_engine.generate(PROMPT_40, SHORT)
    assert full_engine.engine.stats()["tokens_evicted"] == 0
    per_request = _tiny_llm(tiny_llama)
    per_request.generate(PROMPT_40, replace(SHORT, kv_policy="full"))
    assert per_request.engine.stats()["tokens_evicted"] == 0


def test_request_metrics_follow_the_lifecycle():
    # One running sequence at a time: m1 waits behind m0.
    engine = LLM(kv_cache_bytes="64MiB", max_num_seqs=1).engine
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    engine.add_request("m0", "The lifecycle of a request", params)
    engine.add_request("m1", "and of the one behind it", params)
    seen: dict[str, list] = {"m0": [], "m1": []}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen[out.request_id].append(out.metrics)
    first, m = seen["m0"][0], seen["m0"][-1]
    assert first.finished_time is None and first.first_token_time is not None
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time
    assert m.first_token_time < m.last_token_time <= m.finished_time
    assert m.time_in_queue >= 0
    m1 = seen["m1"][-1]
    assert m1.first_scheduled_time >= m.finished_time
    assert m1.time_in_queue > m.time_in_queue
    # An abort before any token: finished, no token times.
    engine.add_request("m2", "never mind", params)
    out = engine.abort_request("m2")
    assert out.metrics.finished_time is not None and out.metrics.first_token_time is None
    assert engine.kv.num_used_blocks == 0


def test_offline_outputs_carry_their_timeline(llm):
    """LLM.generate's outputs keep the engine's RequestMetrics (TTFT is
    first_token_time - arrival_time); with n > 1, one timeline: the first
    token of any completion, the last finish of all."""
    params = SamplingParams(max_tokens=4, n=2, temperature=1.0, seed=3, ignore_eos=True)
    single, pair = llm.generate(["one two", "three four"], [SamplingParams(max_tokens=3), params])
    for out in (single, pair):
        m = out.metrics
        assert m is not None
        assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time
        assert m.first_token_time <= m.last_token_time <= m.finished_time
