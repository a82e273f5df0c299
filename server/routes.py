"""The app's routes, one router per concern, each over only what it needs.

Whether a router needs the API key is decided where the app includes it
(server/app.py), so the rule sits in one place: every client route needs it,
the probes (/health, /metrics) do not.
"""

from collections.abc import Awaitable, Callable
from importlib import metadata

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from engine.loading.tokenizer import Tokenizer
from server.async_engine import AsyncEngine
from server.errors import (
    BadRequestError,
    DrainingError,
    ServiceUnavailableError,
    check_api_key,
    error_response,
)
from server.params import check_model
from server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    VersionResponse,
)
from server.serving_chat import ChatServer, render_messages
from server.serving_completions import CompletionServer


def package_version() -> str:
    try:
        return metadata.version("keyserve")
    except metadata.PackageNotFoundError:  # running from a bare checkout
        return "unknown"


def api_key_check(api_key: str | None) -> Callable[[Request], Awaitable[None]]:
    """A FastAPI dependency refusing requests that lack `api_key` (None: no auth)."""

    async def authorized(request: Request) -> None:
        check_api_key(request, api_key)

    return authorized


def openai_routes(
    completions: CompletionServer,
    chat: ChatServer,
    model_name: str,
    max_model_len: int,
) -> APIRouter:
    """/v1/completions, /v1/chat/completions and /v1/models, as OpenAI's API has them."""
    router = APIRouter()

    @router.post("/v1/completions")
    async def create_completion(body: CompletionRequest, raw: Request) -> Response:
        return await completions.create(body, raw)

    @router.post("/v1/chat/completions")
    async def create_chat_completion(body: ChatCompletionRequest, raw: Request) -> Response:
        return await chat.create(body, raw)

    @router.get("/v1/models")
    async def list_models() -> ModelList:
        # root is the served name too: where the weights lie on this machine
        # is none of a client's business.
        card = ModelCard(id=model_name, root=model_name, max_model_len=max_model_len)
        return ModelList(data=[card])

    return router


def _require_tokenizer(tokenizer: Tokenizer | None) -> Tokenizer:
    if tokenizer is None:
        raise BadRequestError("this model has no tokenizer")
    return tokenizer


def tokenizer_routes(tokenizer: Tokenizer | None, model_name: str, max_model_len: int) -> APIRouter:
    """/tokenize and /detokenize (vLLM's extensions), with the server's own tokenizer."""
    router = APIRouter()

    @router.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        check_model(body.model, model_name)
        known = _require_tokenizer(tokenizer)
        if (body.prompt is None) == (body.messages is None):
            raise BadRequestError("give exactly one of prompt and messages", "prompt")
        text = body.prompt
        if body.messages is not None:
            text = render_messages(known, body.messages, body.add_generation_prompt)
        tokens = known.encode(text)
        return TokenizeResponse(count=len(tokens), max_model_len=max_model_len, tokens=tokens)

    @router.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        check_model(body.model, model_name)
        known = _require_tokenizer(tokenizer)
        bad = [t for t in body.tokens if not 0 <= t < known.vocab_size]
        if bad:
            raise BadRequestError(
                f"token ids out of range [0, {known.vocab_size}): {bad[:5]}", "tokens"
            )
        return DetokenizeResponse(prompt=known.decode(body.tokens, skip_special_tokens=False))

    return router


def about_routes(app: FastAPI) -> APIRouter:
    """/version and /openapi.json: what runs here (so behind the key, like client routes)."""
    router = APIRouter()

    @router.get("/version")
    async def version() -> VersionResponse:
        return VersionResponse(version=package_version())

    @router.get("/openapi.json", include_in_schema=False)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    return router


def probe_routes(async_engine: AsyncEngine) -> APIRouter:
    """/health for load balancers and /metrics for Prometheus."""
    router = APIRouter()

    @router.get("/health")
    async def health() -> Response:
        if not async_engine.healthy:
            # 503, not 500: a load balancer reads it as "take me out of rotation".
            return error_response(
                ServiceUnavailableError("the engine loop is not running", code="engine_dead")
            )
        if async_engine.draining:
            return error_response(DrainingError())
        return JSONResponse({"status": "ok"})

    @router.get("/metrics")
    async def metrics() -> Response:
        assert async_engine.metrics is not None
        body, content_type = async_engine.metrics.render()
        return Response(body, media_type=content_type)

    return router
