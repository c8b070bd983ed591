"""Bidirectional streams of inference requests, shared by classifier.v1 and KServe v2."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

# Requests of one stream in flight at once: enough for them to share batches, bounded so that a client
# that sends faster than the model answers is held back by the stream's flow control.
STREAM_WINDOW = 64


async def answer_in_order(requests: AsyncIterator[Any], handle: Callable[[Any], Awaitable[Any]],
                          window: int) -> AsyncIterator[tuple[Any, Any]]:
    """Start each request as it arrives, at most `window` unanswered at once (so they share batches), and
    yield (request, result or the exception it raised) in arrival order: one failure does not end the stream."""
    slots = asyncio.Semaphore(window)
    pending: asyncio.Queue = asyncio.Queue()

    async def read() -> None:
        try:
            async for msg in requests:
                await slots.acquire()
                await pending.put((msg, asyncio.ensure_future(handle(msg))))
        finally:
            await pending.put(None)

    reader = asyncio.create_task(read())
    try:
        while (item := await pending.get()) is not None:
            msg, task = item
            try:
                outcome = await task
            except Exception as e:  # noqa: BLE001 - answered as this request's error
                outcome = e
            slots.release()
            yield msg, outcome
        await reader
    finally:
        reader.cancel()
        while not pending.empty():  # the caller went away: work nobody will read is cancelled
            item = pending.get_nowait()
            if item is not None:
                item[1].cancel()
