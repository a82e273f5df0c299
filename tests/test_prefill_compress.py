"""Prompts compressed while they prefill (issue 22 part 1): an evicting
sequence is cut to its budget after every prompt chunk, so it never holds
more than its budget plus one chunk, and a prompt larger than the whole pool
runs; the kept keys and their scores equal the dense reference's with the
same chunking."""

import httpx
import pytest
import torch
from dense_reference import DenseReference, compare_cuts
from live_server import LiveServer
from test_server_errors import assert_error
from tiny_models import FAMILIES, build_tiny_model

from engine import LLM, EngineConfig, LLMEngine, SamplingParams
from kv_manager.manager import blocks_for
from kv_manager.policies import KVPolicySettings
from server import ServerSettings, create_app

KV = dict(kv_ratio=0.3, kv_min_tokens=0, recent_ratio=0.25, sink_tokens=2)
CHUNK = 16


@pytest.fixture(scope="module", params=["llama", "llama-head-64"])
def small(request, tmp_path_factory):
    return build_tiny_model(request.param, tmp_path_factory.mktemp(request.param))


def _prompt(n: int, seed: int = 7) -> list[int]:
    return torch.randint(3, 250, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("policy", ["h2o", "keyformer"])
def test_chunked_cuts_keep_the_dense_references_keys_and_scores(small, policy):
    llm = LLM(
        model=str(small), skip_tokenizer_init=True, dtype="float32", block_size=4,
        kv_cache_blocks=64, max_num_batched_tokens=CHUNK,
    )  # fmt: skip
    prompt = _prompt(70)  # budget 21: cut at 16, 32, 48, 64 and 70
    params = SamplingParams(
        temperature=0.0, seed=11, max_tokens=3, ignore_eos=True, kv_policy=policy, **KV
    )
    checked, held = compare_cuts(llm, prompt, params, CHUNK)
    # The mid-prompt cuts (the later chunks' scores on a compacted cache) and
    # the prompt's end were all compared, each at exactly the budget.
    assert checked[:5] == [16, 32, 48, 64, 70]
    assert [held[n][1].shape[-1] for n in checked[:5]] == [16, 21, 21, 21, 21]
    # Compressing while prefilling is not the same as after the whole prompt.
    whole = DenseReference(llm.engine.model, KVPolicySettings(kv_policy=policy, **KV))
    whole.on_cut = lambda n: None
    whole.generate(prompt, params)
    assert any(
        whole.kept(layer, h) != set(held[70][1][layer, h].tolist())
        for layer in range(held[70][1].shape[0])
        for h in range(held[70][1].shape[1])
    )


def test_chunk_boundaries_do_not_depend_on_the_batch(small):
    """A cut point is every CHUNK-th prompt token whatever shares the batch:
    a seeded keyformer request gives the same tokens alone and beside others
    that end its chunks early."""
    llm = LLM(
        model=str(small), skip_tokenizer_init=True, dtype="float32", block_size=4,
        kv_cache_blocks=128, max_num_batched_tokens=CHUNK,
    )  # fmt: skip
    p = SamplingParams(temperature=0.8, seed=3, max_tokens=6, ignore_eos=True,
                       kv_policy="keyformer", **KV)  # fmt: skip
    prompt = _prompt(50)
    alone = llm.generate([prompt], p)[0].outputs[0].token_ids
    others = [_prompt(n, seed=n) for n in (5, 9, 13)]
    batch = llm.generate([*others, prompt], [p] * 3 + [p])
    assert batch[-1].outputs[0].token_ids == alone
    assert llm.engine.kv.num_used_blocks == 0


# -- a prompt larger than the whole pool ---------------------------------------------

BIG = dict(block_size=16, kv_cache_blocks=128, max_num_batched_tokens=1024)  # 2,048 tokens


@pytest.fixture(scope="module")
def long_context(tmp_path_factory):
    config = FAMILIES["llama"]()
    config.max_position_embeddings = 8192
    return build_tiny_model("llama", tmp_path_factory.mktemp("long"), config=config)


def big_params(policy: str) -> SamplingParams:
    return SamplingParams(
        temperature=0.0, max_tokens=4, ignore_eos=True, kv_policy=policy, kv_max_tokens=1024
    )


def test_a_prompt_larger_than_the_pool_runs_compressed_while_prefilling(long_context):
    llm = LLM(model=str(long_context), skip_tokenizer_init=True, dtype="float32", **BIG)
    engine = llm.engine
    prompt = _prompt(7000)
    engine.add_request("big", prompt, big_params("keyformer"))
    peak, steps = 0, 0
    limit = blocks_for(1024 + 1024, 16)  # budget + one chunk: the whole pool here
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
        peak = max(peak, engine.peak_kv_blocks_used)
        assert engine.peak_kv_blocks_used <= limit
        assert engine.kv.pool.num_free + engine.kv.num_blocks_held() == 128
        if engine.has_unfinished_requests():  # after each step's cut: the budget
            assert engine.kv.num_slots("big") == 1024
    assert steps == 7 + 3  # 7 prompt chunks (6 of 1,024 and one of 856), 3 decodes
    assert peak == limit
    assert engine.kv.num_used_blocks == 0 and engine.kv.pool.num_free == 128


def test_a_full_prompt_larger_than_the_pool_is_refused_with_a_reason(long_context):
    llm = LLM(model=str(long_context), skip_tokenizer_init=True, dtype="float32", **BIG)
    with pytest.raises(ValueError, match=r"^prompt \(7000 tokens\) plus max_tokens \(4\).*"
                       r"needs 438 KV blocks.*whole pool has 128 \(2048 tokens\)"):  # fmt: skip
        llm.engine.add_request("full", _prompt(7000), big_params("full"))
    # An evicting budget that cannot fit with one chunk beside it is refused too.
    with pytest.raises(ValueError, match=r"^prompt \(7000 tokens\) compressed to its budget "
                       r"\(1100 tokens\) plus one prefill chunk \(1024 tokens\)"):  # fmt: skip
        p = SamplingParams(max_tokens=4, kv_policy="h2o", kv_max_tokens=1100)
        llm.engine.add_request("h2o", _prompt(7000), p)
    assert not llm.engine.has_unfinished_requests()
    # Without max_tokens, a full request gets what the pool holds past its prompt.
    llm.engine.add_request("short", _prompt(48), SamplingParams(max_tokens=None, kv_policy="full"))
    assert llm.engine.scheduler.requests["short"].max_tokens == 2048 - 48


def test_over_http_keyformer_runs_it_and_full_is_a_400(long_context):
    engine = LLMEngine(
        EngineConfig(
            model=str(long_context), skip_tokenizer_init=True, dtype="float32",
            kv_policy="keyformer", kv_max_tokens=1024, **BIG,
        )
    )  # fmt: skip
    body = {"model": "tiny", "prompt": _prompt(7000), "max_tokens": 4, "temperature": 0}
    with LiveServer(create_app(engine, ServerSettings(model_name="tiny"))) as s:
        r = httpx.post(f"{s.url}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        assert usage["prompt_tokens"] == 7000 and usage["completion_tokens"] == 4
        assert usage["kv_cache_details"]["budget_tokens"] == 1024
        r = httpx.post(f"{s.url}/v1/completions", json={**body, "kv_policy": "full"}, timeout=60)
        error = assert_error(r, 400, "prompt")
        assert "whole pool has 128 (2048 tokens)" in error["message"]
        assert engine.peak_kv_blocks_used <= 128 and engine.kv.num_used_blocks == 0
