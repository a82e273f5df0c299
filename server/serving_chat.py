"""POST /v1/chat/completions: messages through the model's chat template, then generate."""

import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from engine.outputs import Logprob
from engine.tokenizer import Tokenizer
from server.async_engine import AsyncEngine, RequestGroup
from server.errors import APIError, BadRequestError, bad_request_from, error_response
from server.params import build_sampling_params, check_model, fan_out, usage_of
from server.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    ChatLogprobs,
    ChatLogprobToken,
    ChatMessage,
    ChatMessageOut,
    ChatStreamChoice,
    DeltaMessage,
    TopLogprob,
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

_FIELDS = set(ChatCompletionRequest.model_fields)
# The engine speaks of "prompt"; a chat client wrote "messages".
_ALIASES = {"prompt": "messages"}


def render_messages(
    tokenizer: Tokenizer | None, messages: list[ChatMessage], add_generation_prompt: bool = True
) -> str:
    """The prompt text: messages through the model's chat template."""
    if tokenizer is None:
        raise BadRequestError("this model has no tokenizer, so no chat template", "messages")
    plain = []
    for i, message in enumerate(messages):
        item = message.model_dump(exclude_none=True)
        if isinstance(message.content, list):
            parts = message.content
            if any(p.type != "text" for p in parts):
                raise BadRequestError(
                    "only text content parts are supported", f"messages.{i}.content"
                )
            item["content"] = "".join(p.text or "" for p in parts)
        item.setdefault("content", "")
        plain.append(item)
    try:
        return tokenizer.apply_chat_template(plain, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja raises its own errors for messages a template refuses
        raise BadRequestError(f"the chat template refused the messages: {e}", "messages") from e


def _validate(request: ChatCompletionRequest) -> None:
    if request.tools:
        raise BadRequestError("tools are not supported", "tools")
    if request.response_format is not None and request.response_format.type != "text":
        raise BadRequestError("only response_format type 'text' is supported", "response_format")
    if request.top_logprobs is not None and not request.logprobs:
        raise BadRequestError("top_logprobs needs logprobs set to true", "top_logprobs")


class ChatServer:
    def __init__(self, engine: AsyncEngine, tokenizer: Tokenizer | None, model_name: str) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name

    async def create(self, request: ChatCompletionRequest, raw: Request) -> Response:
        """The response, or an OpenAI error object: a client's mistake is a 4xx body."""
        try:
            return await self._create(request, raw)
        except APIError as e:
            return error_response(e)

    async def _create(self, request: ChatCompletionRequest, raw: Request) -> Response:
        check_model(request.model, self.model_name)
        _validate(request)
        prompt = render_messages(self.tokenizer, request.messages, request.add_generation_prompt)
        max_tokens = request.max_completion_tokens or request.max_tokens  # None: to the context
        top_n = (request.top_logprobs or 0) if request.logprobs else None
        params = build_sampling_params(request, max_tokens, top_n)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        try:
            group = await self.engine.add(fan_out(request_id, [prompt], params, request.n))
        except ValueError as e:
            raise bad_request_from(e, _FIELDS, _ALIASES) from e
        if request.stream:
            return AbortingStreamingResponse(self._stream(request, request_id, group), group.abort)
        outputs = await collect_or_abort(raw, group)
        if outputs is None:
            return Response(status_code=499)  # nobody is listening
        for out in outputs:
            raise_if_failed(out)
        choices = []
        for i, out in enumerate(outputs):
            c = out.outputs[0]
            logprobs = None
            if top_n is not None and c.logprobs is not None:
                logprobs = chat_logprobs(c.token_ids, c.logprobs, top_n)
            choices.append(
                ChatChoice(
                    index=i,
                    message=ChatMessageOut(content=c.text),
                    logprobs=logprobs,
                    finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason,
                )
            )
        body = ChatCompletionResponse(
            id=request_id,
            model=self.model_name,
            choices=choices,
            usage=usage_of(outputs, request.n),
        )
        return JSONResponse(body.model_dump())

    async def _stream(
        self, request: ChatCompletionRequest, request_id: str, group: RequestGroup
    ) -> AsyncIterator[str]:
        def chunk(choices: list[ChatStreamChoice], usage=None) -> str:
            return sse(
                ChatCompletionStreamResponse(
                    id=request_id, model=self.model_name, choices=choices, usage=usage
                )
            )

        top_n = (request.top_logprobs or 0) if request.logprobs else None
        num = len(group.request_ids)
        deltas = Deltas(num)
        try:
            # OpenAI opens every choice with the role, before any content.
            for i in range(num):
                yield chunk(
                    [ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))]
                )
            async for updates in group.updates():
                for index, out in updates:
                    raise_if_failed(out)  # an error event, then [DONE]; the rest is aborted
                    c = out.outputs[0]
                    text, start, end = deltas.take(index, out)
                    logprobs = None
                    if top_n is not None and c.logprobs is not None and end > start:
                        logprobs = chat_logprobs(
                            c.token_ids[start:end], c.logprobs[start:end], top_n
                        )
                    if text or logprobs or c.finish_reason:
                        choice = ChatStreamChoice(
                            index=index,
                            delta=DeltaMessage(content=text or None),
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


def _top(token: str, logprob: float) -> TopLogprob:
    return TopLogprob(token=token, logprob=logprob, bytes=list(token.encode("utf-8")))


def chat_logprobs(
    token_ids: list[int], entries: list[dict[int, Logprob]], top_n: int
) -> ChatLogprobs:
    """Chat logprobs: per token its logprob and the top_n alternatives, best first."""
    content = []
    for token_id, entry in zip(token_ids, entries, strict=False):
        chosen = entry[token_id]
        token = chosen.decoded_token or ""
        ranked = sorted((lp for lp in entry.values() if lp.rank <= top_n), key=lambda lp: lp.rank)
        content.append(
            ChatLogprobToken(
                token=token,
                logprob=chosen.logprob,
                bytes=list(token.encode("utf-8")),
                top_logprobs=[_top(lp.decoded_token or "", lp.logprob) for lp in ranked],
            )
        )
    return ChatLogprobs(content=content)
