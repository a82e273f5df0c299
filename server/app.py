"""The FastAPI app: thin routes (server/routes.py) over the serving classes."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware

from engine import LLMEngine
from engine.loading.tokenizer import Tokenizer, load_tokenizer
from server.async_engine import AsyncEngine
from server.errors import check_api_key_setting, install_error_handlers
from server.limits import DEFAULT_MAX_REQUEST_BYTES, DEFAULT_MAX_WAITING, BodySizeLimit
from server.metrics import ServerMetrics
from server.routes import (
    about_routes,
    api_key_check,
    openai_routes,
    package_version,
    probe_routes,
    tokenizer_routes,
)
from server.serving_chat import ChatServer
from server.serving_completions import CompletionServer


@dataclass
class ServerSettings:
    model_name: str  # what clients put in "model"
    api_key: str | None = None  # None: no auth
    # Bodies past this are refused with 413 before any parsing.
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    # Origins allowed cross-origin (CORS); None: no CORS headers at all.
    allowed_origins: list[str] | None = None

    def __post_init__(self) -> None:
        check_api_key_setting(self.api_key)


def create_app(
    engine: LLMEngine, settings: ServerSettings, max_waiting: int | None = DEFAULT_MAX_WAITING
) -> FastAPI:
    """An app serving `engine` (already loaded); the engine thread starts with the app."""
    async_engine = AsyncEngine(engine, ServerMetrics(settings.model_name), max_waiting)
    # The server gets its own tokenizer: Hugging Face fast tokenizers must not
    # be used from two threads at once, and the engine thread uses its own.
    tokenizer = None if engine.tokenizer is None else load_tokenizer(engine.model_path)
    return build_app(async_engine, settings, tokenizer)


def build_app(
    async_engine: AsyncEngine, settings: ServerSettings, tokenizer: Tokenizer | None
) -> FastAPI:
    """The app over an AsyncEngine that its lifespan starts and shuts down."""
    app = _bare_app(async_engine)
    install_error_handlers(app)
    _add_middleware(app, settings)
    _include_routes(app, async_engine, settings, tokenizer)
    return app


def _bare_app(async_engine: AsyncEngine) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await async_engine.start()
        yield
        await async_engine.shutdown()

    # No /docs or /redoc (they pull scripts from a CDN); /openapi.json is
    # served by about_routes, behind the API key like every client route.
    app = FastAPI(
        title="keyserve",
        version=package_version(),
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.engine = async_engine
    return app


def _add_middleware(app: FastAPI, settings: ServerSettings) -> None:
    if settings.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.allowed_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    # Added last, so it runs first: an oversized body is refused before anything reads it.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)


def _include_routes(
    app: FastAPI, async_engine: AsyncEngine, settings: ServerSettings, tokenizer: Tokenizer | None
) -> None:
    name, max_model_len = settings.model_name, async_engine.engine.max_model_len
    completions = CompletionServer(async_engine, tokenizer, name)
    chat = ChatServer(async_engine, tokenizer, name)
    # Everything a client calls needs the key (/version and /openapi.json
    # too: they tell an attacker what runs here); probes and Prometheus do not.
    needs_key = [Depends(api_key_check(settings.api_key))]
    client_routers = (
        openai_routes(completions, chat, name, max_model_len),
        tokenizer_routes(tokenizer, name, max_model_len),
        about_routes(app),
    )
    for router in client_routers:
        app.include_router(router, dependencies=needs_key)
    app.include_router(probe_routes(async_engine))
