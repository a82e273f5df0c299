"""What the completion and chat endpoints share: submit a request's prompts as
one group, then either stream each choice's deltas as server-sent events or
wait for the whole outputs; a client's mistake becomes an OpenAI error body.

Each endpoint supplies only its shapes: the whole response, the stream's
opening events, and the event for one choice's delta.
"""

import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from engine import RequestOutput
from engine.loading.tokenizer import Tokenizer
from engine.runtime.llm_engine import PromptType
from engine.runtime.sampling_params import SamplingParams
from server.async_engine import AsyncEngine, RequestGroup
from server.errors import APIError, BadRequestError, bad_request_from, error_response
from server.limits import MAX_SEQUENCES_PER_REQUEST
from server.params import fan_out, usage_of
from server.protocol import UsageInfo
from server.streaming import (
    DONE,
    AbortingStreamingResponse,
    Deltas,
    cancel_on_disconnect,
    raise_if_failed,
    sse,
    sse_error,
)


def _check_sequences(num_prompts: int, n: int) -> None:
    """A 400 for a call that would add more than MAX_SEQUENCES_PER_REQUEST
    sequences, before any is built: no retry could ever queue it."""
    count = num_prompts * n
    if count > MAX_SEQUENCES_PER_REQUEST:
        raise BadRequestError(
            f"this request asks for {count} sequences ({num_prompts} prompts x n={n}); "
            f"at most {MAX_SEQUENCES_PER_REQUEST} per request",
            "n" if n > 1 else "prompt",
        )


class Delta:
    """One choice's news since its last event: text, and the token range."""

    def __init__(self, index: int, output: RequestOutput, text: str, start: int, end: int):
        self.index, self.output, self.text = index, output, text
        self.start, self.end = start, end


class GenerationServer:
    """Base of CompletionServer and ChatServer."""

    id_prefix = ""  # "cmpl", "chatcmpl"
    stream_response: type[BaseModel]  # the model of one stream event
    fields: set[str] = set()  # the request's field names, to name a bad one
    aliases: dict[str, str] = {}  # engine argument -> request field

    def __init__(self, engine: AsyncEngine, tokenizer: Tokenizer | None, model_name: str) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name

    async def create(self, request: Any, raw: Request) -> Response:
        """The response, or an OpenAI error object: a client's mistake is a 4xx body."""
        try:
            response = await cancel_on_disconnect(raw, self._create(request, raw))
        except APIError as e:
            return error_response(e)
        # None: the client left first, and its requests were aborted.
        return Response(status_code=499) if response is None else response

    async def _create(self, request: Any, raw: Request) -> Response:
        raise NotImplementedError

    async def _generate(
        self, request: Any, raw: Request, prompts: Sequence[PromptType], params: SamplingParams
    ) -> Response:
        """Submit `prompts` (request.n choices each) and answer, streamed or whole."""
        _check_sequences(len(prompts), request.n)
        request_id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        try:
            group = await self.engine.add(fan_out(request_id, prompts, params, request.n))
        except ValueError as e:
            raise bad_request_from(e, self.fields, self.aliases) from e
        if request.stream:
            return AbortingStreamingResponse(self._stream(request, request_id, group), group.abort)
        try:
            outputs = await group.final()
        finally:
            # Cancelled (the client left: cancel_on_disconnect) or failed:
            # abort what is still generating, so its blocks are freed now.
            group.abort()
        for out in outputs:
            raise_if_failed(out)
        body = self._response(request, request_id, outputs, usage_of(outputs, request.n))
        return JSONResponse(body.model_dump())

    def _response(
        self, request: Any, request_id: str, outputs: list[RequestOutput], usage: UsageInfo
    ) -> BaseModel:
        """The whole (non-streamed) response body."""
        raise NotImplementedError

    def _chunk(self, request_id: str, choices: list, usage: UsageInfo | None = None) -> str:
        """One stream event holding `choices` (and the usage, at the end)."""
        return sse(
            self.stream_response(id=request_id, model=self.model_name, choices=choices, usage=usage)
        )

    def _opening(self, request: Any, request_id: str, num_choices: int) -> list[str]:
        """Events sent before any output (chat: each choice's role)."""
        return []

    def _stream_state(self, num_choices: int) -> Any:
        """Per-stream bookkeeping handed to every `_delta_events` call (or None)."""
        return None

    def _delta_events(self, request: Any, request_id: str, delta: Delta, state: Any) -> list[str]:
        """The events for one choice's delta (none when there is nothing to say)."""
        raise NotImplementedError

    async def _stream(
        self, request: Any, request_id: str, group: RequestGroup
    ) -> AsyncIterator[str]:
        deltas = Deltas(len(group.request_ids))
        state = self._stream_state(len(group.request_ids))
        try:
            for event in self._opening(request, request_id, len(group.request_ids)):
                yield event
            async for updates in group.updates():
                for index, out in updates:
                    raise_if_failed(out)  # an error event, then [DONE]; the rest is aborted
                    delta = Delta(index, out, *deltas.take(index, out))
                    for event in self._delta_events(request, request_id, delta, state):
                        yield event
            if request.stream_options and request.stream_options.include_usage:
                yield self._chunk(request_id, [], usage_of(group.latest, request.n))
        except APIError as e:  # the engine died mid-stream, or this request failed
            yield sse_error(e)
        yield DONE
