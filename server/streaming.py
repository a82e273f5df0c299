"""Server-sent events, deltas from cumulative outputs, and client-disconnect handling."""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from engine import RequestOutput
from server.errors import APIError, GenerationError

T = TypeVar("T")

DONE = "data: [DONE]\n\n"


def raise_if_failed(output: RequestOutput) -> None:
    """A request the engine finished with an error (and freed) fails its whole API call."""
    if output.outputs[0].finish_reason == "error":
        raise GenerationError()


def sse(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


def sse_error(error: APIError) -> str:
    # OpenAI's SDK raises on an event whose data carries an "error" object.
    return sse(error.body())


class Deltas:
    """What each choice has already sent: the engine's outputs are cumulative
    (text and token ids), so a delta is the part past what was sent."""

    def __init__(self, num_choices: int) -> None:
        self.chars = [0] * num_choices
        self.tokens = [0] * num_choices

    def take(self, index: int, output: RequestOutput) -> tuple[str, int, int]:
        """(new text, first new token index, end token index) for choice `index`."""
        completion = output.outputs[0]
        text = completion.text[self.chars[index] :]
        start, end = self.tokens[index], len(completion.token_ids)
        self.chars[index] = len(completion.text)
        self.tokens[index] = end
        return text, start, end


class AbortingStreamingResponse(StreamingResponse):
    """A StreamingResponse that runs `on_close` however the response ends.

    A generator's own `finally` does not run when the client leaves before its
    first chunk (an unstarted generator has no frame to unwind), so the abort
    hangs on the response instead.
    """

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream")
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def _wait_disconnect(request: Request) -> None:
    # The body is read by now, so the next ASGI message can only be the disconnect.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T | None:
    """`work`'s result, or None once the client has gone, `work` then cancelled.

    vLLM's with_cancellation: a handler waiting for the engine (for its turn
    in the command queue, or for a whole non-streamed answer) would otherwise
    carry on for a client that gave up, and keep its requests queued and
    running. Cancelling it aborts them wherever it waits (AsyncEngine.add,
    GenerationServer._generate).
    """
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        # Also when this handler itself is cancelled (server shutdown).
        gone.cancel()
        if not task.done():
            task.cancel()
    if task.done():
        return task.result()
    with contextlib.suppress(asyncio.CancelledError):
        await task  # let its aborts run before the handler returns
    return None
