"""LLMEngine behind asyncio: one background thread steps the engine, the event
loop serves the requests.

The engine is not thread-safe, so only its thread ever touches it. The event
loop sends it commands (add, abort, stop) through a queue that the thread
applies between steps; outputs travel back with loop.call_soon_threadsafe.
The one exception is its grammar compiler, thread-safe by design: requests'
grammars compile in worker threads, never in the engine's step loop.
"""

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from engine import LLMEngine, RequestOutput, SamplingParams, StructuredOutputsParams
from engine.host.malloc import keep_freed_host_memory
from engine.host.openmp import release_thread_pool
from engine.runtime.llm_engine import PromptType
from server.errors import DrainingError, EngineDeadError, QueueFullError
from server.metrics import ServerMetrics

logger = logging.getLogger(__name__)

EngineRequest = tuple[str, PromptType, SamplingParams]  # (request id, prompt, params)


class RequestGroup:
    """The engine requests of one API call (n completions of each prompt), read as one stream.

    Only the latest output of each request is kept: outputs are cumulative, so
    a slow reader skips the intermediate ones and memory stays bounded. Lives
    on the event loop; the engine thread reaches it through call_soon_threadsafe.
    """

    def __init__(self, owner: "AsyncEngine", request_ids: list[str]) -> None:
        self.request_ids = request_ids
        self.latest: list[RequestOutput | None] = [None] * len(request_ids)
        self._owner = owner
        self._index = {rid: i for i, rid in enumerate(request_ids)}
        self._unfinished = set(range(len(request_ids)))
        self._dirty: set[int] = set()
        self._event = asyncio.Event()
        self._error: BaseException | None = None

    @property
    def finished(self) -> bool:
        return not self._unfinished

    def _deliver(self, output: RequestOutput) -> None:
        i = self._index[output.request_id]
        self.latest[i] = output
        self._dirty.add(i)
        if output.finished:
            self._unfinished.discard(i)
        self._event.set()

    def _fail(self, error: BaseException) -> None:
        self._error = error
        self._event.set()

    async def updates(self) -> AsyncIterator[list[tuple[int, RequestOutput]]]:
        """Yield [(index, latest output)] for the requests that moved, until all finish."""
        while True:
            await self._event.wait()
            self._event.clear()
            if self._dirty:
                batch = [(i, self.latest[i]) for i in sorted(self._dirty)]
                self._dirty.clear()
                yield batch
            if self._error is not None:
                raise self._error
            if not self._unfinished:
                return

    async def final(self) -> list[RequestOutput]:
        """Every request's finished output, in request order."""
        async for _ in self.updates():
            pass
        return list(self.latest)

    def abort(self) -> None:
        """Abort the unfinished requests (the client went away). Safe to call twice."""
        if self._unfinished and self._error is None:
            self._owner.abort([self.request_ids[i] for i in self._unfinished])


# -- commands from the event loop to the engine thread ----------------------------


@dataclass
class _Add:
    requests: list[EngineRequest]
    group: RequestGroup
    arrival: float
    done: asyncio.Future


@dataclass
class _Abort:
    request_ids: list[str] | None  # None: everything


_STOP = object()


@dataclass
class _Tracked:
    """Engine-thread bookkeeping of one request, for routing and metrics."""

    group: RequestGroup
    arrival: float
    num_tokens: int = 0
    first_token: float | None = None


class AsyncEngine:
    """Owns the engine thread. All public methods are called from the event loop."""

    def __init__(
        self,
        engine: LLMEngine,
        metrics: ServerMetrics | None = None,
        max_waiting: int | None = None,
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.max_waiting = max_waiting
        self.draining = False
        # Set by the engine thread when its loop dies; read by /health.
        self.error: BaseException | None = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._live: set[RequestGroup] = set()
        # Engine-thread only: request id -> its group and timings.
        self._tracked: dict[str, _Tracked] = {}

    # -- lifecycle (event loop) ---------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        # The model was loaded on this thread: its idle OpenMP workers would
        # slow the engine thread's every parallel region (engine/host/openmp.py).
        release_thread_pool()
        # The engine thread allocates from an arena of its own, which would
        # hand its step's memory back to the OS at every free (engine/host/malloc.py).
        keep_freed_host_memory()
        self._thread = threading.Thread(target=self._run, name="keyserve-engine", daemon=True)
        self._thread.start()

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Abort what is left and stop the thread (after its current step)."""
        self._stopped = True
        if self._thread is None:
            return
        self._commands.put(_STOP)
        await asyncio.to_thread(self._thread.join, timeout)

    @property
    def healthy(self) -> bool:
        alive = self._thread is not None and self._thread.is_alive()
        return alive and self.error is None and not self._stopped

    @property
    def num_unfinished_groups(self) -> int:
        """API calls still generating; draining waits for this to reach 0."""
        return len(self._live)

    def start_drain(self) -> None:
        """Refuse new requests from now on; running ones carry on."""
        self.draining = True

    # -- requests (event loop) ---------------------------------------------------

    async def add(self, requests: list[EngineRequest]) -> RequestGroup:
        """Queue the requests of one API call, all or none.

        Raises what the engine raises (ValueError for bad input), QueueFullError,
        DrainingError or EngineDeadError, before anything is generated.
        """
        if self.error is not None or self._stopped:
            raise EngineDeadError("the engine is not running")
        if self.draining:
            raise DrainingError()
        assert self._loop is not None, "AsyncEngine.start() was not called"
        group = RequestGroup(self, [rid for rid, _, _ in requests])
        done = self._loop.create_future()
        self._live.add(group)
        self._commands.put(_Add(requests, group, time.monotonic(), done))
        if self.error is not None:
            # The thread died around the put and may never read the command.
            _settle(done, EngineDeadError("the engine is not running"))
        try:
            await done
        except asyncio.CancelledError:
            group.abort()  # the client left while we waited: free whatever got added
            self._live.discard(group)
            raise
        except BaseException:
            self._live.discard(group)
            raise
        return group

    async def compile_grammar(self, spec: StructuredOutputsParams) -> None:
        """Compile a request's grammar in a worker thread, into the engine's
        cache (add_request then only copies it). ValueError if it does not compile."""
        await asyncio.to_thread(self.engine.structured.compiler.compile, spec)

    def abort(self, request_ids: list[str]) -> None:
        self._commands.put(_Abort(list(request_ids)))

    def abort_all(self) -> None:
        self._commands.put(_Abort(None))

    def _deliver(self, items: list[tuple[RequestGroup, RequestOutput]]) -> None:
        for group, output in items:
            group._deliver(output)
            if group.finished:
                self._live.discard(group)

    def _fail_groups(self, groups: list[RequestGroup], error: BaseException) -> None:
        for group in groups:
            group._fail(error)
            self._live.discard(group)

    # -- the engine thread -----------------------------------------------------------

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as exc:
            logger.exception("the engine loop died; the server is unhealthy")
            self.error = exc
            dead = EngineDeadError(f"the engine loop died: {exc!r}")
            groups = {t.group for t in self._tracked.values()}
            self._tracked.clear()
            self._to_loop(self._fail_groups, list(groups), dead)
            self._settle_pending(dead)

    def _serve(self) -> None:
        while True:
            busy = self.engine.has_unfinished_requests()
            commands = self._take_commands(block=not busy)
            for i, command in enumerate(commands):
                if command is _STOP:
                    self._abort(None)
                    self._settle_pending(
                        EngineDeadError("the server is shutting down"), commands[i + 1 :]
                    )
                    return
                self._apply(command)
            if not self.engine.has_unfinished_requests():
                self._record_stats()  # an abort may have emptied the pool
                continue
            step_start = time.monotonic()
            outputs = self.engine.step()
            self._publish(outputs, step_start)
            self._record_stats()
            if not outputs:
                # A step with no token (a prefill chunk, or nothing schedulable):
                # yield the core briefly rather than spin.
                time.sleep(0.0005)

    def _take_commands(self, block: bool) -> list[Any]:
        commands = [self._commands.get()] if block else []
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                return commands

    def _apply(self, command: Any) -> None:
        if isinstance(command, _Abort):
            self._abort(command.request_ids)
        elif isinstance(command, _Add):
            self._add(command)

    def _add(self, command: _Add) -> None:
        added: list[str] = []
        try:
            waiting = self.engine.stats()["waiting"]
            if self.max_waiting is not None and waiting + len(command.requests) > self.max_waiting:
                raise QueueFullError(
                    f"the queue is full ({waiting} requests waiting, limit {self.max_waiting}); "
                    "retry later"
                )
            for rid, prompt, params in command.requests:
                self.engine.add_request(rid, prompt, params)
                added.append(rid)
                self._tracked[rid] = _Tracked(command.group, command.arrival)
        except Exception as exc:
            for rid in added:  # all or none: a half-added n=4 call helps nobody
                self.engine.abort_request(rid)
                self._tracked.pop(rid, None)
            self._to_loop(_settle, command.done, exc)
            return
        self._to_loop(_settle, command.done, None)

    def _abort(self, request_ids: list[str] | None) -> None:
        ids = list(self._tracked) if request_ids is None else request_ids
        outputs = []
        for rid in ids:
            if rid in self._tracked:
                out = self.engine.abort_request(rid)
                if out is not None:
                    outputs.append(out)
        self._publish(outputs, time.monotonic())

    def _publish(self, outputs: list[RequestOutput], step_start: float) -> None:
        now = time.monotonic()
        items = []
        for out in outputs:
            tracked = self._tracked.get(out.request_id)
            if tracked is None:
                continue
            self._account(tracked, out, now, step_start)
            items.append((tracked.group, out))
            if out.finished:
                del self._tracked[out.request_id]
        if items:
            self._to_loop(self._deliver, items)

    def _account(self, t: _Tracked, out: RequestOutput, now: float, step_start: float) -> None:
        if self.metrics is None:
            return
        completion = out.outputs[0]
        num_tokens = len(completion.token_ids)
        if num_tokens > t.num_tokens:
            if t.first_token is None:
                t.first_token = now
                # Queue time as measured here: from the server's arrival time
                # to the start of the engine step that gave the first token.
                # The engine's out.metrics.first_scheduled_time is another
                # thing: the scheduler sets it when it first admits the
                # request and not again after a preemption. The two nearly agree
                # when the prefill ran in one step; this one also counts the
                # earlier chunks of a chunked prefill, and any running lost to
                # a preemption before the first token.
                queue_time = max(0.0, step_start - t.arrival)
                self.metrics.record_first_token(
                    now - t.arrival, queue_time, len(out.prompt_token_ids)
                )
            self.metrics.generation_tokens.inc(num_tokens - t.num_tokens)
            t.num_tokens = num_tokens
        if out.finished:
            decode = now - t.first_token if t.first_token is not None else 0.0
            reason = completion.finish_reason or "abort"
            self.metrics.record_finished(reason, now - t.arrival, decode, num_tokens)
            if reason != "abort":  # an abort may come before the budget is chosen
                self.metrics.record_kv_budget(out.kv, len(out.prompt_token_ids))

    def _record_stats(self) -> None:
        if self.metrics is not None:
            self.metrics.record_engine_stats(self.engine.stats())

    def _settle_pending(self, error: BaseException, taken: list[Any] | None = None) -> None:
        """Answer the add commands not applied (the thread is about to stop)."""
        for command in (taken or []) + self._take_commands(block=False):
            if isinstance(command, _Add):
                self._to_loop(_settle, command.done, error)

    def _to_loop(self, fn: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        # A closed loop (server gone) leaves nobody to tell.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(fn, *args)


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    # The waiter may have been cancelled (client gone) before the answer came.
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
