"""Graceful shutdown: on SIGTERM, answer new requests with 503 while the
running ones finish (up to a deadline), then stop.

Plain uvicorn closes its listening socket at once on SIGTERM, so new clients
get "connection refused" instead of a 503 they can retry elsewhere, and long
generations are cut at its graceful-shutdown timeout.
"""

import logging
import signal
import time
from types import FrameType

import uvicorn

from server.async_engine import AsyncEngine

logger = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, drain_timeout: float) -> None:
        super().__init__(config)
        self.engine = engine
        self.drain_timeout = drain_timeout
        self._drain_deadline: float | None = None
        self.exit_code = 0  # non-zero when the engine loop died: a restart is due

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A second signal, or Ctrl-C, stops at once: the user means it.
        if sig == signal.SIGTERM and self._drain_deadline is None:
            logger.info("SIGTERM: draining (%d in flight)", self.engine.num_unfinished_groups)
            self._drain_deadline = time.monotonic() + self.drain_timeout
            self.engine.start_drain()
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        # uvicorn calls this every 0.1 s from its main loop.
        if self.engine.error is not None and not self.should_exit:
            # The engine loop died (its requests got errors already): stop, and
            # exit non-zero so that an orchestrator restarts the process.
            logger.error("the engine loop died; exiting so that the server is restarted")
            self.exit_code = 1
            self.should_exit = True
        if self._drain_deadline is not None and not self.should_exit:
            if self.engine.num_unfinished_groups == 0:
                self.should_exit = True
            elif time.monotonic() > self._drain_deadline:
                logger.warning(
                    "drain timeout: aborting %d requests", self.engine.num_unfinished_groups
                )
                self.engine.abort_all()
                self.should_exit = True
        return await super().on_tick(counter)
