"""POST /v1/completions: prompt(s) in, text out, streamed or whole."""

from fastapi import Request
from fastapi.responses import Response

from engine import RequestOutput
from engine.runtime.llm_engine import PromptType
from engine.runtime.outputs import Logprob
from server.errors import BadRequestError
from server.params import build_sampling_params, check_model
from server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    UsageInfo,
)
from server.serving import Delta, GenerationServer

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for this endpoint


def prompt_list(prompt: str | list[str] | list[int] | list[list[int]]) -> list[PromptType]:
    """The request's prompts: one string, strings, one token-id list, or several."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise BadRequestError("prompt must not be empty", "prompt")
    if all(isinstance(t, int) for t in prompt):
        return [list(prompt)]
    return list(prompt)


class _StreamState:
    """Per stream: choices whose echo went out, and each choice's next text_offset."""

    def __init__(self, num_choices: int) -> None:
        self.echoed: set[int] = set()
        self.offsets = [0] * num_choices


class CompletionServer(GenerationServer):
    id_prefix = "cmpl"
    stream_response = CompletionStreamResponse
    fields = set(CompletionRequest.model_fields)

    async def _create(self, request: CompletionRequest, raw: Request) -> Response:
        check_model(request.model, self.model_name)
        if request.suffix:
            raise BadRequestError("suffix is not supported", "suffix")
        if request.echo and request.logprobs is not None:
            # OpenAI gives the prompt's logprobs with echo; the engine computes none.
            raise BadRequestError("echo with logprobs is not supported", "echo")
        if request.echo and self.tokenizer is None:
            raise BadRequestError("echo needs a tokenizer; this model has none", "echo")
        prompts = prompt_list(request.prompt)
        max_tokens = DEFAULT_MAX_TOKENS if request.max_tokens is None else request.max_tokens
        params = build_sampling_params(request, max_tokens, request.logprobs)
        return await self._generate(request, raw, prompts, params)

    def _response(
        self,
        request: CompletionRequest,
        request_id: str,
        outputs: list[RequestOutput],
        usage: UsageInfo,
    ) -> CompletionResponse:
        choices = [self._choice(request, i, out) for i, out in enumerate(outputs)]
        return CompletionResponse(
            id=request_id, model=self.model_name, choices=choices, usage=usage
        )

    def _echo(self, output: RequestOutput) -> str:
        if output.prompt is not None:
            return output.prompt
        assert self.tokenizer is not None
        return self.tokenizer.decode(output.prompt_token_ids, skip_special_tokens=False)

    def _choice(
        self, request: CompletionRequest, index: int, out: RequestOutput
    ) -> CompletionChoice:
        c = out.outputs[0]
        logprobs = None
        if request.logprobs is not None and c.logprobs is not None:
            logprobs = completion_logprobs(c.token_ids, c.logprobs, request.logprobs, 0)
        return CompletionChoice(
            index=index,
            text=(self._echo(out) if request.echo else "") + c.text,
            logprobs=logprobs,
            finish_reason=c.finish_reason,
            stop_reason=c.stop_reason,
        )

    def _stream_state(self, num_choices: int) -> _StreamState:
        return _StreamState(num_choices)

    def _delta_events(
        self, request: CompletionRequest, request_id: str, delta: Delta, state: _StreamState
    ) -> list[str]:
        events = []
        index, c = delta.index, delta.output.outputs[0]
        if request.echo and index not in state.echoed:
            state.echoed.add(index)
            echo = CompletionChoice(index=index, text=self._echo(delta.output))
            events.append(self._chunk(request_id, [echo]))
        logprobs = None
        if request.logprobs is not None and c.logprobs is not None and delta.end > delta.start:
            logprobs = completion_logprobs(
                c.token_ids[delta.start : delta.end],
                c.logprobs[delta.start : delta.end],
                request.logprobs,
                state.offsets[index],
            )
            state.offsets[index] = logprobs.text_offset[-1] + len(logprobs.tokens[-1])
        if delta.text or logprobs or c.finish_reason:
            choice = CompletionChoice(
                index=index,
                text=delta.text,
                logprobs=logprobs,
                finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
            )
            events.append(self._chunk(request_id, [choice]))
        return events


def completion_logprobs(
    token_ids: list[int], entries: list[dict[int, Logprob]], top_n: int, offset: int
) -> CompletionLogprobs:
    """The legacy completions logprobs object for these tokens; text offsets start at `offset`.

    `entries` holds, per token, the sampled token and the top-N alternatives.
    """
    result = CompletionLogprobs()
    for token_id, entry in zip(token_ids, entries, strict=False):
        chosen = entry[token_id]
        token = chosen.decoded_token or ""
        result.tokens.append(token)
        result.token_logprobs.append(chosen.logprob)
        result.text_offset.append(offset)
        offset += len(token)
        ranked = sorted(entry.items(), key=lambda kv: kv[1].rank)
        # Like vLLM: the top N plus the sampled token when it ranks lower.
        result.top_logprobs.append(
            {
                lp.decoded_token or "": lp.logprob
                for tid, lp in ranked
                if lp.rank <= top_n or tid == token_id
            }
        )
    return result
