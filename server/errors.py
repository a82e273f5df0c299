"""OpenAI-shaped errors, {"error": {"message", "type", "param", "code"}}, and
the handlers that make sure a client's mistake is never answered with a 500."""

import hmac
import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error with its HTTP status, raised by handlers and turned into a response."""

    status_code = HTTPStatus.BAD_REQUEST
    type = "invalid_request_error"
    code: str | None = None
    headers: dict[str, str] | None = None

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def body(self) -> ErrorResponse:
        return error_body(self.message, self.type, self.param, self.code)


class BadRequestError(APIError):
    pass


class AuthenticationError(APIError):
    status_code = HTTPStatus.UNAUTHORIZED
    code = "invalid_api_key"


class ModelNotFoundError(APIError):
    status_code = HTTPStatus.NOT_FOUND
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(f"The model `{model}` does not exist.", param="model")


class RequestTooLargeError(APIError):
    status_code = HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    code = "request_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is larger than the server's limit of {limit} bytes")


class ServiceUnavailableError(APIError):
    """Try again later: the queue is full or the server is draining."""

    status_code = HTTPStatus.SERVICE_UNAVAILABLE
    type = "server_error"
    # A hint for clients and load balancers (the OpenAI SDK honours it).
    headers = {"Retry-After": "1"}


class QueueFullError(ServiceUnavailableError):
    code = "queue_full"


class DrainingError(ServiceUnavailableError):
    code = "draining"

    def __init__(self) -> None:
        super().__init__("the server is shutting down and takes no new requests")


class EngineDeadError(APIError):
    """The engine loop stopped; only a restart helps (/health reports it)."""

    status_code = HTTPStatus.INTERNAL_SERVER_ERROR
    type = "server_error"
    code = "engine_dead"


class GenerationError(APIError):
    """One request failed inside the engine (it was finished with an error and
    its blocks freed); the engine and the other requests carry on."""

    status_code = HTTPStatus.INTERNAL_SERVER_ERROR
    type = "server_error"
    code = "internal_error"

    def __init__(self) -> None:
        super().__init__("the request failed while generating; see the server log")


def error_body(
    message: str, type: str, param: str | None = None, code: str | int | None = None
) -> ErrorResponse:
    return ErrorResponse(error=ErrorInfo(message=message, type=type, param=param, code=code))


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(
        error.body().model_dump(), status_code=int(error.status_code), headers=error.headers
    )


def check_api_key_setting(api_key: str | None) -> None:
    """Refuse an empty or blank key where it is configured. "" would accept
    the empty bearer token, a blank key no token at all: most likely a secret
    that came out empty, and the server would run open, or shut to everyone."""
    if api_key is not None and not api_key.strip():
        raise ValueError(
            "the API key (--api-key or $KEYSERVE_API_KEY) is empty: give a key, "
            "or unset it to serve without one"
        )


def check_api_key(request: Request, api_key: str | None) -> None:
    """Raise AuthenticationError unless the request carries `api_key` as a bearer token."""
    if api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    # compare_digest: the time taken must not reveal how much of the key matched.
    ok = scheme.lower() == "bearer" and hmac.compare_digest(
        token.strip().encode(), api_key.encode()
    )
    if not ok:
        raise AuthenticationError("invalid or missing API key (send Authorization: Bearer KEY)")


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _is_type_tag(part: object) -> bool:
    """pydantic names the member of a union that failed: `stop.list[str]`, `content.str`."""
    if not isinstance(part, str):
        return False
    return part in _TYPE_TAGS or "[" in part or part.startswith(("function-", "lax-"))


def _param_of(loc: tuple) -> str | None:
    # FastAPI locates body errors as ("body", field, index, ...); drop "body",
    # and the union-member tags after the field (never the field itself).
    parts = [p for p in loc if p != "body"]
    parts = parts[:1] + [p for p in parts[1:] if not _is_type_tag(p)]
    return ".".join(str(p) for p in parts) or None


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"malformed JSON body: {first.get('ctx', {}).get('error', first['msg'])}", None
    param = _param_of(tuple(first.get("loc", ())))
    if param is None:  # the body as a whole: empty, a list, a string...
        return "the request body must be a JSON object", None
    text = "; ".join(f"{_param_of(tuple(e.get('loc', ()))) or 'body'}: {e['msg']}" for e in errors)
    return text, param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(BadRequestError(message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Unknown routes, wrong methods: keep the OpenAI shape for those too.
        body = error_body(str(exc.detail), "invalid_request_error")
        return JSONResponse(body.model_dump(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        # Our bug, not the client's: log it, and say no more than that.
        logger.exception("unhandled error", exc_info=exc)
        body = error_body("internal server error", "server_error")
        return JSONResponse(body.model_dump(), status_code=500)


def bad_request_from(
    exc: ValueError, fields: set[str], aliases: dict[str, str] | None = None
) -> BadRequestError:
    """A 400 from an engine ValueError. The engine's messages start with the
    offending field's name ("temperature must be ...", "kv_policy must be one
    of ..."), so that word becomes `param` when it names a request field."""
    message = str(exc)
    first = message.split(" ", 1)[0].strip(":,")
    first = (aliases or {}).get(first, first)
    return BadRequestError(message, param=first if first in fields else None)
