"""POST /v1/chat/completions: messages through the model's chat template, then generate."""

from fastapi import Request
from fastapi.responses import Response

from engine import RequestOutput
from engine.loading.tokenizer import Tokenizer
from engine.runtime.outputs import Logprob
from server.errors import BadRequestError
from server.logprobs import prompt_logprobs_out
from server.params import build_sampling_params, check_model, check_prompt_logprobs
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
    UsageInfo,
)
from server.serving import Delta, GenerationServer
from server.structured_output import structured_outputs_for


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
    if request.top_logprobs is not None and not request.logprobs:
        raise BadRequestError("top_logprobs needs logprobs set to true", "top_logprobs")
    check_prompt_logprobs(request)


class ChatServer(GenerationServer):
    id_prefix = "chatcmpl"
    stream_response = ChatCompletionStreamResponse
    fields = set(ChatCompletionRequest.model_fields)
    # The engine speaks of "prompt"; a chat client wrote "messages".
    aliases = {"prompt": "messages"}

    async def _create(self, request: ChatCompletionRequest, raw: Request) -> Response:
        check_model(request.model, self.model_name)
        _validate(request)
        prompt = render_messages(self.tokenizer, request.messages, request.add_generation_prompt)
        max_tokens = request.max_completion_tokens or request.max_tokens  # None: to the context
        # A stream never shows prompt logprobs: compute them for whole responses only.
        prompt_logprobs = None if request.stream else request.prompt_logprobs
        structured = await structured_outputs_for(self.engine, request)
        params = build_sampling_params(
            request, max_tokens, _top_n(request), prompt_logprobs, structured
        )
        return await self._generate(request, raw, [prompt], params)

    def _response(
        self,
        request: ChatCompletionRequest,
        request_id: str,
        outputs: list[RequestOutput],
        usage: UsageInfo,
    ) -> ChatCompletionResponse:
        top_n = _top_n(request)
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
        return ChatCompletionResponse(
            id=request_id,
            model=self.model_name,
            choices=choices,
            usage=usage,
            # The n choices share one prompt: its logprobs are the same in each.
            prompt_logprobs=prompt_logprobs_out(outputs[0], request.prompt_logprobs),
        )

    def _opening(
        self, request: ChatCompletionRequest, request_id: str, num_choices: int
    ) -> list[str]:
        # OpenAI opens every choice with the role, before any content.
        role = DeltaMessage(role="assistant", content="")
        return [
            self._chunk(request_id, [ChatStreamChoice(index=i, delta=role)])
            for i in range(num_choices)
        ]

    def _delta_events(
        self, request: ChatCompletionRequest, request_id: str, delta: Delta, state: None
    ) -> list[str]:
        top_n, c = _top_n(request), delta.output.outputs[0]
        logprobs = None
        if top_n is not None and c.logprobs is not None and delta.end > delta.start:
            logprobs = chat_logprobs(
                c.token_ids[delta.start : delta.end], c.logprobs[delta.start : delta.end], top_n
            )
        if not (delta.text or logprobs or c.finish_reason):
            return []
        choice = ChatStreamChoice(
            index=delta.index,
            delta=DeltaMessage(content=delta.text or None),
            logprobs=logprobs,
            finish_reason=c.finish_reason,
            stop_reason=c.stop_reason,
        )
        return [self._chunk(request_id, [choice])]


def _top_n(request: ChatCompletionRequest) -> int | None:
    """Alternatives per token when logprobs are asked for, else None."""
    return (request.top_logprobs or 0) if request.logprobs else None


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
