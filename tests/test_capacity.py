"""Eviction turns into capacity: freed blocks admit more sequences at once."""

import pytest
import torch
from tiny_models import build_tiny_model

from engine import LLM, SamplingParams


@pytest.fixture(scope="module")
def long_context_model(tmp_path_factory):
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    return build_tiny_model("llama", tmp_path_factory.mktemp("long"), config=config)


def _prompts(count: int, length: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 250, (length,), generator=g).tolist() for _ in range(count)]


def _peak_running(llm: LLM, prompts, params) -> int:
    engine = llm.engine
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    peak = 0
    while engine.has_unfinished_requests():
        engine.step()
        peak = max(peak, engine.scheduler.num_running)
    assert engine.kv.num_used_blocks == 0
    return peak


@pytest.mark.timeout(900)
def test_keyformer_at_half_runs_1_8x_the_sequences_of_full(long_context_model):
    """A pool sized for 16 sequences of 1,024 + 256 tokens under `full`."""
    block_size, prompt_len, new_tokens = 16, 1024, 256
    pool_blocks = 16 * (prompt_len + new_tokens) // block_size
    kwargs = dict(
        model=str(long_context_model),
        skip_tokenizer_init=True,
        block_size=block_size,
        kv_cache_blocks=pool_blocks,
        max_num_seqs=64,
        max_num_batched_tokens=4096,
    )
    prompts = _prompts(40, prompt_len)
    base = dict(temperature=0, max_tokens=new_tokens, ignore_eos=True)

    # `full` gets all 40 prompts, more than its pool holds at once, so what caps
    # its batch is the pool, not the number of prompts.
    full = LLM(**kwargs)
    full_peak = _peak_running(full, prompts, SamplingParams(**base, kv_policy="full"))
    full_stats = full.engine.stats()

    kf = LLM(**kwargs)
    kf_peak = _peak_running(
        kf, prompts, SamplingParams(**base, kv_policy="keyformer", kv_ratio=0.5, seed=1)
    )
    stats = kf.engine.stats()
    # Admission needs a whole prompt's blocks free, so at most 20 prompts fit
    # (the pool is 16 full-length sequences); decoding then fills it.
    prompts_the_pool_holds = pool_blocks // (prompt_len // block_size)
    assert prompts_the_pool_holds == 20
    assert 16 <= full_peak <= prompts_the_pool_holds < len(prompts), full_peak
    assert full_stats["peak_kv_blocks_used"] == pool_blocks, full_stats
    assert kf_peak >= 1.8 * 16, (kf_peak, full_peak)
    # No preemption storm: the compressed sequences fit as admitted.
    assert stats["preemptions"] <= 2, stats
    assert stats["blocks_freed_by_eviction"] > 0


def test_freed_blocks_admit_the_next_request_at_once(long_context_model):
    """The pool holds one 64-token prompt plus a compressed sequence: the
    second request is admitted in the step right after the first one's cut."""
    prompts = _prompts(2, 64)
    llm = LLM(
        model=str(long_context_model),
        skip_tokenizer_init=True,
        block_size=4,
        kv_cache_blocks=16 + 9,
        max_num_batched_tokens=64,
    )
    engine = llm.engine
    params = SamplingParams(
        temperature=0, max_tokens=8, ignore_eos=True, kv_policy="h2o", kv_ratio=0.5, kv_min_tokens=0
    )
    engine.add_request("a", prompts[0], params)
    engine.add_request("b", prompts[1], params)
    engine.step()  # a's prompt (16 blocks), then cut to 32 slots (8 blocks)
    assert engine.scheduler.num_running == 1 and engine.kv.num_used_blocks == 8
    engine.step()  # b fits in what the cut freed
    assert engine.scheduler.num_running == 2
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.kv.num_used_blocks == 0
