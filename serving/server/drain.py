"""Admission of calls, and the drain before the server exits.

Every call of the server's own services enters through `Admission` (handlers.py wraps each handler once).
While the server accepts, a call is counted in flight until it ends. `close()` stops accepting: a new call
is refused with ShuttingDown (UNAVAILABLE, which clients retry on another replica), and each open stream
stops reading. The requests a stream has read are still answered, in order, and the stream then ends
UNAVAILABLE, so its client knows that whatever it sent after that was not run. `wait_idle` returns once
no call is left; `wait_quiet` then keeps refusing until callers have stopped coming, and only then does the
server close its port and unload its models.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterable, AsyncIterator

from .errors import ShuttingDown

SHUTTING_DOWN = "the server is shutting down; send the call to another replica"
# After the last admitted call, the port stays open (refusing) until no call has come for QUIET_S, for at most
# QUIET_LIMIT_S. gRPC cancels the calls it has received but not yet handed to a handler when the port closes:
# a client whose last call was just answered, and which sends its next one at once, would see CANCELLED.
QUIET_S = 0.25
QUIET_LIMIT_S = 2.0
STREAM_CUT = ("the server is shutting down: the requests this stream sent before now were answered; send the "
              "rest to another replica")


class Admission:
    def __init__(self) -> None:
        self.accepting = True
        self.in_flight = 0            # calls admitted and not yet ended (unary and streams)
        self.refused = 0              # calls refused since close()
        self._last_refused = -math.inf
        self._idle: asyncio.Event | None = None
        self._reading: set[asyncio.Task] = set()  # stream readers waiting for their client's next message
        self._cut: set[asyncio.Task] = set()      # the readers close() cancelled, told apart from other cancels

    def enter(self) -> None:
        if not self.accepting:
            self.refused += 1
            self._last_refused = time.monotonic()
            raise ShuttingDown(SHUTTING_DOWN)
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1
        if not self.in_flight and self._idle is not None:
            self._idle.set()

    def close(self) -> None:
        """Stop accepting calls, and stop every open stream's reading (what it has read is still answered)."""
        if not self.accepting:
            return
        self.accepting = False
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
        """Keep refusing until no call has come for `quiet_s` (callers told UNAVAILABLE have gone elsewhere),
        for at most `limit_s`."""
        start = time.monotonic()
        end = start + limit_s
        # Counted from the later of the last refusal and now (the last admitted call has just ended): a caller
        # answered a moment ago may already have sent its next call, which must meet a refusal, not a closed port.
        while (now := time.monotonic()) < end and (wait := max(self._last_refused, start) + quiet_s - now) > 0:
            await asyncio.sleep(min(wait, end - now))

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
