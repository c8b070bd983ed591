"""Admission of calls, and the drain before the server exits.

Every call of the server's own services enters through `Admission` (handlers.py wraps each handler once).
While the server accepts, a call is counted in flight until it ends. `close()` stops accepting: a new call
is refused with ShuttingDown (UNAVAILABLE, which clients retry on another replica), and each open stream
stops reading. The requests a stream has read are still answered, in order, and the stream then ends
UNAVAILABLE, so its client knows that whatever it sent after that was not run. `wait_idle` returns once
no call is left; `wait_quiet` then keeps refusing until callers have stopped coming, and once the streams
being refused have ended (`wait_refused_streams_ended`) the port and the connections are closed
(connections.py) before gRPC stops.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterable, AsyncIterator

from ..engine.errors import ShuttingDown

SHUTTING_DOWN = "the server is shutting down; send the call to another replica"
# After the last admitted call, the port stays open (refusing) until no call has come or ended for QUIET_S, for
# at most QUIET_LIMIT_S: clients told UNAVAILABLE go elsewhere, and the last answers are written out before the
# connections are cut. Callers that keep coming are cut at the limit, and see UNAVAILABLE all the same.
QUIET_S = 0.25
QUIET_LIMIT_S = 2.0
# Before the connections are cut, the streams being refused are let end first (for at most this long): a
# grpc.aio client still writing on a stream when its connection closes reports INTERNAL, not UNAVAILABLE.
STREAMS_END_LIMIT_S = 0.5
STREAM_CUT = ("the server is shutting down: the requests this stream sent before now were answered; send the "
              "rest to another replica")


class Admission:
    def __init__(self) -> None:
        self.accepting = True
        self.in_flight = 0            # calls admitted and not yet ended (unary and streams)
        self.refused = 0              # calls refused since close()
        self.refusing_streams = 0     # refused streams not yet ended (handlers.py reads their requests first)
        self._last_seen = -math.inf   # since close(): when a call was last refused or ended
        self._idle: asyncio.Event | None = None
        self._reading: set[asyncio.Task] = set()  # stream readers waiting for their client's next message
        self._cut: set[asyncio.Task] = set()      # the readers close() cancelled, told apart from other cancels

    def enter(self) -> None:
        if not self.accepting:
            self.refused += 1
            self._last_seen = time.monotonic()
            raise ShuttingDown(SHUTTING_DOWN)
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1
        if not self.accepting:
            self._last_seen = time.monotonic()
        if not self.in_flight and self._idle is not None:
            self._idle.set()

    def close(self) -> None:
        """Stop accepting calls, and stop every open stream's reading (what it has read is still answered)."""
        if not self.accepting:
            return
        self.accepting = False
        # The quiet is counted from here at the earliest: calls already on their way when the server stopped
        # accepting reach it after this moment.
        self._last_seen = time.monotonic()
        self._idle = asyncio.Event()
        if not self.in_flight:
            self._idle.set()
        for task in self._reading:  # each waits in its client's next message: wake it, to end its stream
            self._cut.add(task)
            task.cancel()

    async def wait_idle(self, timeout_s: float) -> bool:
        """After close(): wait until every admitted call has ended; False when some still run at the timeout."""
        assert self._idle is not None, "close() first"
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def wait_quiet(self, quiet_s: float = QUIET_S, limit_s: float = QUIET_LIMIT_S) -> None:
        """Keep refusing until no call has come or ended for `quiet_s` (callers told UNAVAILABLE have gone
        elsewhere, the last answers are written), for at most `limit_s`."""
        end = time.monotonic() + limit_s
        while (now := time.monotonic()) < end and (wait := self._last_seen + quiet_s - now) > 0:
            await asyncio.sleep(min(wait, end - now))

    async def wait_refused_streams_ended(self, limit_s: float = STREAMS_END_LIMIT_S) -> None:
        """Until no refused stream is still open, for at most `limit_s`. It returns in the step that saw none, so
        that a caller cutting connections right after finds none open."""
        end = time.monotonic() + limit_s
        while self.refusing_streams and time.monotonic() < end:
            await asyncio.sleep(0.002)

    def stream_reads(self, requests: AsyncIterable) -> StreamReads:
        return StreamReads(self, requests)


class StreamReads:
    """A stream's requests as the servicer reads them, ending early (with `cut` set) once the server stops
    accepting. The servicer sees a normal end of its requests and answers those it holds."""

    __slots__ = ("_admission", "_requests", "cut")

    def __init__(self, admission: Admission, requests: AsyncIterable):
        self._admission = admission
        self._requests: AsyncIterator = aiter(requests)
        self.cut = False

    def __aiter__(self) -> StreamReads:
        return self

    async def __anext__(self):
        admission = self._admission
        if not admission.accepting:
            self.cut = True
            raise StopAsyncIteration
        task = asyncio.current_task()
        admission._reading.add(task)
        try:
            return await anext(self._requests)
        except asyncio.CancelledError:
            if task not in admission._cut:
                raise  # the call itself was cancelled (its client went away)
            admission._cut.discard(task)
            if task.uncancel():
                raise  # cancelled by someone else as well
            self.cut = True
            raise StopAsyncIteration from None
        finally:
            admission._reading.discard(task)
