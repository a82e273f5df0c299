"""Prompt logprobs (vLLM's SamplingParams(prompt_logprobs=N)) on tiny random
models, against transformers' own forward pass over the whole prompt:
every prompt token's logprob, rank and top-N exactly once, however the prompt
is batched, chunked or preempted; and only the requests that ask have their
prompt rows turned into logits."""

import pytest
import torch
from tiny_models import VOCAB, build_tiny_model, load_reference, reference_greedy

from engine import LLM, SamplingParams
from scheduler import RequestStatus

NEW_TOKENS = 6
TOL = 1e-4  # float32, two implementations of the same model


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


PROMPTS = [_prompt(5, 1), _prompt(17, 2), _prompt(40, 3)]


def _params(prompt_logprobs: int | None, max_tokens: int = NEW_TOKENS) -> SamplingParams:
    return SamplingParams(
        temperature=0, max_tokens=max_tokens, ignore_eos=True, prompt_logprobs=prompt_logprobs
    )


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def family(request, tmp_path_factory):
    folder = build_tiny_model(request.param, tmp_path_factory.mktemp(request.param))
    return folder, load_reference(folder)


def _llm(folder, **kwargs) -> LLM:
    kwargs = {"block_size": 4, "kv_cache_blocks": 64, "kv_policy": "full", **kwargs}
    return LLM(model=str(folder), skip_tokenizer_init=True, dtype="float32", **kwargs)


@torch.no_grad()
def _reference(model, prompt: list[int]) -> torch.Tensor:
    """[len(prompt) - 1, vocab]: row k is the log-distribution of prompt token k + 1."""
    logits = model(torch.tensor([prompt])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)[:-1]


def _check(entries, prompt: list[int], reference: torch.Tensor, top_n: int) -> None:
    assert len(entries) == len(prompt) and entries[0] is None
    for k in range(1, len(prompt)):
        entry, row, token = entries[k], reference[k - 1], prompt[k]
        # The prompt token's own logprob, and its rank (near-ties may go either way).
        value = float(row[token])
        assert entry[token].logprob == pytest.approx(value, abs=TOL)
        lowest = int((row > value + TOL).sum()) + 1
        highest = int((row > value - TOL).sum()) + 1
        assert lowest <= entry[token].rank <= highest
        # The top-N: ranks 1..N holding the N largest logprobs, plus the token.
        ranked = sorted((lp for lp in entry.values() if lp.rank <= top_n), key=lambda lp: lp.rank)
        assert [lp.rank for lp in ranked] == list(range(1, top_n + 1))
        best = row.topk(top_n).values.tolist()
        assert [lp.logprob for lp in ranked] == pytest.approx(best, abs=TOL)
        assert all(lp.rank <= top_n for t, lp in entry.items() if t != token)
        for tid, lp in entry.items():
            assert lp.logprob == pytest.approx(float(row[tid]), abs=TOL)


def test_prompt_logprobs_equal_transformers_forward(family):
    folder, reference = family
    llm = _llm(folder)
    outs = llm.generate(PROMPTS, [_params(3), _params(0), _params(3)])
    for out, prompt, top_n in zip(outs, PROMPTS, [3, 0, 3], strict=True):
        _check(out.prompt_logprobs, prompt, _reference(reference, prompt), top_n)
        # Asking for them leaves the generated tokens as they were.
        assert out.outputs[0].token_ids == reference_greedy(reference, prompt, NEW_TOKENS)
    assert llm.engine.kv.num_used_blocks == 0


def test_requests_that_do_not_ask_get_none(family):
    folder, _ = family
    out = _llm(folder).generate(PROMPTS[1], _params(None))[0]
    assert out.prompt_logprobs is None


def test_chunked_prefill_scores_each_prompt_token_once(family):
    folder, reference = family
    # 8 tokens a step: the 40-token prompt is scored over five chunks.
    outs = _llm(folder, max_num_batched_tokens=8).generate(PROMPTS, _params(2))
    for out, prompt in zip(outs, PROMPTS, strict=True):
        _check(out.prompt_logprobs, prompt, _reference(reference, prompt), 2)


def test_preemption_mid_prompt_scores_each_prompt_token_once(family):
    """15 blocks of 4 slots, 8 tokens a step: request b (40 tokens) is
    preempted after scoring part of its prompt, when the older request a needs
    a block to decode; its recompute must not score those tokens again."""
    folder, reference = family
    llm = _llm(folder, kv_cache_blocks=15, max_num_batched_tokens=8)
    engine = llm.engine
    engine.add_request("a", PROMPTS[1], _params(None, max_tokens=30))
    for _ in range(3):
        engine.step()
    engine.add_request("b", PROMPTS[2], _params(2))
    preempted_with = []
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
        b = engine.scheduler.requests.get("b")
        if b is not None and b.status == RequestStatus.PREEMPTED and not preempted_with:
            preempted_with.append(len(engine._states["b"].prompt_logprobs))
    # It was preempted part-way through its prompt, and recomputed.
    assert preempted_with and 1 < preempted_with[0] < len(PROMPTS[2])
    _check(final["b"].prompt_logprobs, PROMPTS[2], _reference(reference, PROMPTS[2]), 2)
    expected = reference_greedy(reference, PROMPTS[2], NEW_TOKENS)
    assert final["b"].outputs[0].token_ids == expected


def test_only_requests_that_ask_turn_prompt_rows_into_logits(family):
    """Logits rows computed = tokens sampled, plus each asking request's
    prompt tokens after its first: other prompt rows never reach the LM head."""
    folder, _ = family
    llm = _llm(folder, max_num_batched_tokens=16)
    rows: list[int] = []
    compute_logits = llm.engine.model.compute_logits

    def counting(hidden: torch.Tensor) -> torch.Tensor:
        rows.append(hidden.shape[0])
        return compute_logits(hidden)

    llm.engine.model.compute_logits = counting
    llm.generate(PROMPTS, _params(None))
    assert sum(rows) == NEW_TOKENS * len(PROMPTS)
    rows.clear()
    llm.generate(PROMPTS, [_params(None), _params(1), _params(None)])
    assert sum(rows) == NEW_TOKENS * len(PROMPTS) + len(PROMPTS[1]) - 1


@pytest.mark.parametrize("value", [-1, 21])
def test_prompt_logprobs_out_of_range_is_refused(value):
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=value)
