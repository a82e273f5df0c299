"""POST /v1/completions: prompt(s) in, text out, streamed or whole."""

from fastapi import Request
from fastapi.responses import Response

from engine import RequestOutput
from engine.runtime.llm_engine import PromptType
from server.errors import BadRequestError
from server.logprobs import completion_logprobs, prompt_logprobs_out
from server.params import build_sampling_params, check_model, check_prompt_logprobs
from server.protocol import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamChoice,
    CompletionStreamResponse,
    UsageInfo,
)
from server.serving import Delta, GenerationServer
from server.structured_output import structured_outputs_for

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
        if request.echo and self.tokenizer is None:
            raise BadRequestError("echo needs a tokenizer; this model has none", "echo")
        check_prompt_logprobs(request)
        prompts = prompt_list(request.prompt)
        max_tokens = DEFAULT_MAX_TOKENS if request.max_tokens is None else request.max_tokens
        structured = await structured_outputs_for(self.engine, request)
        params = build_sampling_params(
            request,
            max_tokens,
            request.logprobs,
            _engine_prompt_logprobs(request),
            structured,
        )
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

    def _decode(self, token_id: int) -> str:
        assert self.tokenizer is not None
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _choice(
        self, request: CompletionRequest, index: int, out: RequestOutput
    ) -> CompletionChoice:
        c = out.outputs[0]
        logprobs = None
        if request.logprobs is not None and c.logprobs is not None:
            token_ids, entries = c.token_ids, list(c.logprobs)
            if request.echo and out.prompt_logprobs is not None:
                # OpenAI's echo: the prompt's tokens lead, the first with a null logprob.
                token_ids = out.prompt_token_ids + token_ids
                entries = out.prompt_logprobs + entries
            logprobs = completion_logprobs(token_ids, entries, request.logprobs, 0, self._decode)
        shown = request.logprobs if request.prompt_logprobs is None else request.prompt_logprobs
        return CompletionChoice(
            index=index,
            text=(self._echo(out) if request.echo else "") + c.text,
            logprobs=logprobs,
            finish_reason=c.finish_reason,
            stop_reason=c.stop_reason,
            prompt_logprobs=prompt_logprobs_out(out, shown),
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
            events.append(self._chunk(request_id, [self._echo_choice(request, delta, state)]))
        logprobs = None
        if request.logprobs is not None and c.logprobs is not None and delta.end > delta.start:
            logprobs = completion_logprobs(
                c.token_ids[delta.start : delta.end],
                c.logprobs[delta.start : delta.end],
                request.logprobs,
                state.offsets[index],
                self._decode,
            )
            state.offsets[index] = logprobs.text_offset[-1] + len(logprobs.tokens[-1])
        if delta.text or logprobs or c.finish_reason:
            choice = CompletionStreamChoice(
                index=index,
                text=delta.text,
                logprobs=logprobs,
                finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
            )
            events.append(self._chunk(request_id, [choice]))
        return events

    def _echo_choice(
        self, request: CompletionRequest, delta: Delta, state: _StreamState
    ) -> CompletionStreamChoice:
        """The echoed prompt, once per choice, with its tokens' logprobs when asked."""
        out, logprobs = delta.output, None
        if request.logprobs is not None and out.prompt_logprobs is not None:
            logprobs = completion_logprobs(
                out.prompt_token_ids, out.prompt_logprobs, request.logprobs, 0, self._decode
            )
            state.offsets[delta.index] = logprobs.text_offset[-1] + len(logprobs.tokens[-1])
        return CompletionStreamChoice(index=delta.index, text=self._echo(out), logprobs=logprobs)


def _engine_prompt_logprobs(request: CompletionRequest) -> int | None:
    """Top-N per prompt token for the engine: what prompt_logprobs asks (not
    streamed: a stream never shows them), and at least `logprobs` with echo,
    whose logprobs cover the prompt's tokens too."""
    n = None if request.stream else request.prompt_logprobs
    if request.echo and request.logprobs is not None:
        n = max(n or 0, request.logprobs)
    return n
