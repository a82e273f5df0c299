"""The FastAPI app: thin routes over the serving classes."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from importlib import metadata

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response

from engine import LLMEngine
from engine.loading.tokenizer import Tokenizer, load_tokenizer
from server.async_engine import AsyncEngine
from server.errors import (
    BadRequestError,
    DrainingError,
    ServiceUnavailableError,
    check_api_key,
    error_response,
    install_error_handlers,
)
from server.limits import DEFAULT_MAX_REQUEST_BYTES, BodySizeLimit
from server.metrics import ServerMetrics
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


@dataclass
class ServerSettings:
    model_name: str  # what clients put in "model"
    model_root: str | None = None  # where the weights came from (shown by /v1/models)
    api_key: str | None = None  # None: no auth
    # Bodies past this are refused with 413 before any parsing.
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    # Origins allowed cross-origin (CORS); None: no CORS headers at all.
    allowed_origins: list[str] | None = None


def package_version() -> str:
    try:
        return metadata.version("keyserve")
    except metadata.PackageNotFoundError:  # running from a bare checkout
        return "unknown"


def create_app(
    engine: LLMEngine, settings: ServerSettings, max_waiting: int | None = None
) -> FastAPI:
    """An app serving `engine` (already loaded); the engine thread starts with the app."""
    if settings.model_root is None:
        settings = replace(settings, model_root=str(engine.model_path))
    async_engine = AsyncEngine(engine, ServerMetrics(settings.model_name), max_waiting)
    # The server gets its own tokenizer: Hugging Face fast tokenizers must not
    # be used from two threads at once, and the engine thread uses its own.
    tokenizer = None if engine.tokenizer is None else load_tokenizer(engine.model_path)
    return build_app(async_engine, settings, tokenizer)


def build_app(
    async_engine: AsyncEngine, settings: ServerSettings, tokenizer: Tokenizer | None
) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await async_engine.start()
        yield
        await async_engine.shutdown()

    # No /docs or /redoc (they pull scripts from a CDN); /openapi.json is
    # served below, behind the API key like every client route.
    app = FastAPI(
        title="keyserve",
        version=package_version(),
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.engine = async_engine
    install_error_handlers(app)
    if settings.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.allowed_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    # Added last, so it runs first: an oversized body is refused before anything reads it.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    completions = CompletionServer(async_engine, tokenizer, settings.model_name)
    chat = ChatServer(async_engine, tokenizer, settings.model_name)
    max_model_len = async_engine.engine.max_model_len

    async def authorized(request: Request) -> None:
        check_api_key(request, settings.api_key)

    # Everything a client calls needs the key (/version and /openapi.json
    # too: they tell an attacker what runs here); probes and Prometheus do not.
    api = APIRouter(dependencies=[Depends(authorized)])

    @api.post("/v1/completions")
    async def create_completion(body: CompletionRequest, raw: Request) -> Response:
        return await completions.create(body, raw)

    @api.post("/v1/chat/completions")
    async def create_chat_completion(body: ChatCompletionRequest, raw: Request) -> Response:
        return await chat.create(body, raw)

    @api.get("/v1/models")
    async def list_models() -> ModelList:
        card = ModelCard(
            id=settings.model_name, root=settings.model_root, max_model_len=max_model_len
        )
        return ModelList(data=[card])

    @api.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        check_model(body.model, settings.model_name)
        if tokenizer is None:
            raise BadRequestError("this model has no tokenizer")
        if (body.prompt is None) == (body.messages is None):
            raise BadRequestError("give exactly one of prompt and messages", "prompt")
        text = body.prompt
        if body.messages is not None:
            text = render_messages(tokenizer, body.messages, body.add_generation_prompt)
        tokens = tokenizer.encode(text)
        return TokenizeResponse(count=len(tokens), max_model_len=max_model_len, tokens=tokens)

    @api.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        check_model(body.model, settings.model_name)
        if tokenizer is None:
            raise BadRequestError("this model has no tokenizer")
        bad = [t for t in body.tokens if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise BadRequestError(
                f"token ids out of range [0, {tokenizer.vocab_size}): {bad[:5]}", "tokens"
            )
        return DetokenizeResponse(prompt=tokenizer.decode(body.tokens, skip_special_tokens=False))

    @api.get("/version")
    async def version() -> VersionResponse:
        return VersionResponse(version=package_version())

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    app.include_router(api)

    @app.get("/health")
    async def health() -> Response:
        if not async_engine.healthy:
            # 503, not 500: a load balancer reads it as "take me out of rotation".
            return error_response(
                ServiceUnavailableError("the engine loop is not running", code="engine_dead")
            )
        if async_engine.draining:
            return error_response(DrainingError())
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        assert async_engine.metrics is not None
        body, content_type = async_engine.metrics.render()
        return Response(body, media_type=content_type)

    return app
