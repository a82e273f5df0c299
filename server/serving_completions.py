"""POST /v1/completions: prompt(s) in, text out, streamed or whole."""

import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from engine import RequestOutput
from engine.llm_engine import PromptType
from engine.outputs import Logprob
from engine.tokenizer import Tokenizer
from server.async_engine import AsyncEngine, RequestGroup
from server.errors import APIError, BadRequestError, bad_request_from, error_response
from server.params import build_sampling_params, check_model, fan_out, usage_of
from server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
)
from server.streaming import (
    DONE,
    AbortingStreamingResponse,
    Deltas,
    collect_or_abort,
    raise_if_failed,
    sse,
    sse_error,
)

_FIELDS = set(CompletionRequest.model_fields)
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


class CompletionServer:
    def __init__(self, engine: AsyncEngine, tokenizer: Tokenizer | None, model_name: str) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name

    async def create(self, request: CompletionRequest, raw: Request) -> Response:
        """The response, or an OpenAI error object: a client's mistake is a 4xx body."""
        try:
            return await self._create(request, raw)
        except APIError as e:
            return error_response(e)

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
        request_id = f"cmpl-{uuid.uuid4().hex}"
        try:
            group = await self.engine.add(fan_out(request_id, prompts, params, request.n))
        except ValueError as e:
            raise bad_request_from(e, _FIELDS) from e
        if request.stream:
            return AbortingStreamingResponse(self._stream(request, request_id, group), group.abort)
        outputs = await collect_or_abort(raw, group)
        if outputs is None:
            return Response(status_code=499)  # nobody is listening
        for out in outputs:
            raise_if_failed(out)
        choices = [self._choice(request, i, out) for i, out in enumerate(outputs)]
        body = CompletionResponse(
            id=request_id,
            model=self.model_name,
            choices=choices,
            usage=usage_of(outputs, request.n),
        )
        return JSONResponse(body.model_dump())

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

    async def _stream(
        self, request: CompletionRequest, request_id: str, group: RequestGroup
    ) -> AsyncIterator[str]:
        def chunk(choices: list[CompletionChoice], usage=None) -> str:
            return sse(
                CompletionStreamResponse(
                    id=request_id, model=self.model_name, choices=choices, usage=usage
                )
            )

        deltas = Deltas(len(group.request_ids))
        offsets = [0] * len(group.request_ids)  # text_offset of the next token, per choice
        echoed: set[int] = set()
        try:
            async for updates in group.updates():
                for index, out in updates:
                    raise_if_failed(out)  # an error event, then [DONE]; the rest is aborted
                    if request.echo and index not in echoed:
                        echoed.add(index)
                        yield chunk([CompletionChoice(index=index, text=self._echo(out))])
                    c = out.outputs[0]
                    text, start, end = deltas.take(index, out)
                    logprobs = None
                    if request.logprobs is not None and c.logprobs is not None and end > start:
                        logprobs = completion_logprobs(
                            c.token_ids[start:end],
                            c.logprobs[start:end],
                            request.logprobs,
                            offsets[index],
                        )
                        offsets[index] = logprobs.text_offset[-1] + len(logprobs.tokens[-1])
                    if text or logprobs or c.finish_reason:
                        choice = CompletionChoice(
                            index=index,
                            text=text,
                            logprobs=logprobs,
                            finish_reason=c.finish_reason,
                            stop_reason=c.stop_reason,
                        )
                        yield chunk([choice])
            if request.stream_options and request.stream_options.include_usage:
                yield chunk([], usage_of(group.latest, request.n))
        except APIError as e:  # the engine died mid-stream, or this request failed
            yield sse_error(e)
        yield DONE


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
