"""The request-size limit, enforced on the raw bytes before any JSON parsing.

A declared Content-Length over the limit is refused before the body is read;
a chunked body (no length) is read up to the limit and refused the moment it
passes it, so a client cannot make the server buffer more than the limit.
"""

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import RequestTooLargeError, error_response

DEFAULT_MAX_REQUEST_BYTES = 1 << 20  # 1 MiB: far above any prompt the context can hold
# Sequences (engine requests) waiting for admission; past it a 503 with
# Retry-After. Unbounded, a burst would queue work no client waits for that
# long, and each waiting prompt holds host memory: 16 batches of the default
# max_num_seqs (64) is already a long wait.
DEFAULT_MAX_WAITING = 1024
# Sequences one API call may add (prompts x n): past it a 400. A 1 MiB body
# holds some 100,000 token-id prompts, and n goes to 128 (OpenAI's bound);
# unbounded, one call could fill the queue by itself, and fanning it out
# would stall the event loop first.
MAX_SEQUENCES_PER_REQUEST = 256


class BodySizeLimit:
    """Pure ASGI middleware: 413 in OpenAI's error shape for bodies over `max_bytes`.

    The body is read here, whole, and replayed to the app; later receive()
    calls (the disconnect that aborts a request) pass straight through.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                await self.app(scope, _replay([message], receive), send)
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([body], receive), send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(RequestTooLargeError(self.max_bytes))
        # The rest of the body is not read: close the connection rather than
        # let the client keep streaming into a keep-alive socket.
        response.headers["Connection"] = "close"
        await response(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed
