"""Per-request generation state: detokenize, check stops, build outputs."""

from dataclasses import dataclass, field

import torch

from engine.loading.tokenizer import Tokenizer
from engine.runtime.detokenizer import IncrementalDetokenizer, find_stop
from engine.runtime.outputs import (
    CompletionOutput,
    KVUsage,
    Logprob,
    PromptLogprobs,
    RequestMetrics,
    RequestOutput,
)
from engine.runtime.sampler import SampledToken, SamplingRow
from engine.runtime.sampling_params import SamplingParams
from engine.runtime.structured_output import SequenceGrammar
from scheduler import Request, RequestStatus


@dataclass
class RequestState:
    """What the engine keeps per request beside the scheduler's Request."""

    prompt: str | None
    params: SamplingParams
    generator: torch.Generator
    stop_token_ids: frozenset[int]  # eos (unless ignore_eos) + stop_token_ids
    detokenizer: IncrementalDetokenizer | None
    text: str = ""
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    stop_reason: str | int | None = None
    # With params.prompt_logprobs: filled while the prompt runs, complete
    # (and no longer written) by the time its first token is sampled.
    prompt_logprobs: PromptLogprobs | None = None
    # Prompt entries whose tokens are decoded (decoding waits for the first
    # token, so that a failure there fails this request alone).
    prompt_decoded: int = 0
    # Where the output stands in its grammar (structured output), else None.
    grammar: SequenceGrammar | None = None
    # Characters held back from streaming while they could start a stop string.
    holdback: int = field(init=False)

    def __post_init__(self) -> None:
        stops = self.params.stop or []
        self.holdback = max((len(s) for s in stops), default=1) - 1
        if self.params.logprobs is not None:
            self.logprobs, self.cumulative_logprob = [], 0.0
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]  # the first token has nothing before it

    def sampling_row(self, request: Request) -> SamplingRow:
        return SamplingRow(
            self.params,
            self.generator,
            request.prompt_token_ids,
            request.output_token_ids,
            self.stop_token_ids,
        )


def process_token(request: Request, state: RequestState, sampled: SampledToken) -> RequestStatus:
    """Account for the token just appended to `request`; returns its new status
    (RUNNING, or a finished state)."""
    token = sampled.token_id
    if state.grammar is not None:
        state.grammar.advance(token)
    _decode_prompt_logprobs(state)
    if state.logprobs is not None and sampled.top_logprobs is not None:
        _decode_logprobs(state, sampled.top_logprobs)
        state.logprobs.append(sampled.top_logprobs)
        state.cumulative_logprob += sampled.logprob
    if token in state.stop_token_ids and len(request.output_token_ids) > state.params.min_tokens:
        state.stop_reason = None if _is_eos(state, token) else token
        return RequestStatus.FINISHED_STOPPED
    if state.detokenizer is not None:
        delta = state.detokenizer.add_token(token)
        state.text += delta
        # Like vLLM, stop strings only count once min_tokens are out.
        past_min = len(request.output_token_ids) > state.params.min_tokens
        if delta and state.params.stop and past_min and _check_stop_strings(state, len(delta)):
            return RequestStatus.FINISHED_STOPPED
    if state.grammar is not None and state.grammar.finished:
        # Complete (the grammar takes nothing but end-of-text): a "stop", as
        # an end-of-text token would be, without spending a step on one.
        return RequestStatus.FINISHED_STOPPED
    if len(request.output_token_ids) >= request.max_tokens:
        return RequestStatus.FINISHED_LENGTH
    return RequestStatus.RUNNING


def _is_eos(state: RequestState, token: int) -> bool:
    return token not in state.params.stop_token_ids


def _check_stop_strings(state: RequestState, new_len: int) -> bool:
    found = find_stop(state.text, new_len, state.params.stop)
    if found is None:
        return False
    index, stop = found
    end = index + len(stop) if state.params.include_stop_str_in_output else index
    state.text = state.text[:end]
    state.stop_reason = stop
    return True


def _decode_logprobs(state: RequestState, top: dict[int, Logprob]) -> None:
    if state.detokenizer is None:
        return
    tok = state.detokenizer.tokenizer
    for token_id, lp in top.items():
        lp.decoded_token = tok.decode([token_id], skip_special_tokens=False)


def _decode_prompt_logprobs(state: RequestState) -> None:
    if state.prompt_logprobs is None:
        return
    for entry in state.prompt_logprobs[state.prompt_decoded :]:
        if entry is not None:
            _decode_logprobs(state, entry)
    state.prompt_decoded = len(state.prompt_logprobs)


def make_output(request: Request, state: RequestState) -> RequestOutput:
    status = request.status
    finished = status.is_finished
    # While running, hold back text that may turn out to begin a stop string.
    text = state.text
    if not finished and state.holdback:
        text = text[: max(0, len(text) - state.holdback)]
    completion = CompletionOutput(
        index=0,
        text=text,
        token_ids=list(request.output_token_ids),
        cumulative_logprob=state.cumulative_logprob,
        # A copy: the engine keeps appending to its own list after this output.
        logprobs=None if state.logprobs is None else list(state.logprobs),
        finish_reason=status.finish_reason,
        stop_reason=state.stop_reason,
    )
    metrics = RequestMetrics(
        request.arrival_time,
        request.first_scheduled_time,
        request.first_token_time,
        request.last_token_time,
        request.finished_time,
    )
    return RequestOutput(
        request.request_id,
        state.prompt,
        request.prompt_token_ids,
        [completion],
        finished,
        metrics,
        # Not copied: complete and never written again once a token is out.
        prompt_logprobs=state.prompt_logprobs,
        kv=_kv_usage(request),
    )


def _kv_usage(request: Request) -> KVUsage | None:
    if request.kv is None:
        return None
    return KVUsage(
        request.kv.settings.kv_policy,
        request.kv.budget,
        request.squeezed_budget,
        len(request.squeezes),
        request.kv.settings.kv_target_mass if request.kv.settings.chooses_budget else None,
    )


def make_tokenizer_state(
    tokenizer: Tokenizer | None, prompt_ids: list[int], params: SamplingParams
) -> IncrementalDetokenizer | None:
    if tokenizer is None:
        return None
    return IncrementalDetokenizer(tokenizer, prompt_ids, params.skip_special_tokens)
