"""Streams of requests answered in arrival order, concurrently, with a bounded window."""

import asyncio

from serving.server.api.streaming import answer_in_order


async def requests(n):
    for i in range(n):
        yield i


def test_results_come_back_in_arrival_order_with_errors_in_place():
    running, peak = 0, 0

    async def handle(i):
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.001 * (10 - i))  # later requests finish first
        running -= 1
        if i == 3:
            raise ValueError("bad request 3")
        return i * i

    async def main():
        return [x async for x in answer_in_order(requests(10), handle, window=4)]

    out = asyncio.run(main())
    assert [m for m, _ in out] == list(range(10))
    assert [r for m, r in out if m != 3] == [i * i for i in range(10) if i != 3]
    assert isinstance(out[3][1], ValueError)
    assert 1 < peak <= 4  # concurrent, and bounded by the window


def test_a_caller_that_goes_away_cancels_the_work_left():
    started, cancelled = [], []

    async def handle(i):
        started.append(i)
        try:
            await asyncio.sleep(10 if i else 0)
        except asyncio.CancelledError:
            cancelled.append(i)
            raise
        return i

    async def main():
        stream = answer_in_order(requests(100), handle, window=8)
        assert (await anext(stream)) == (0, 0)
        await asyncio.sleep(0.01)
        await stream.aclose()  # the client cancelled its stream
        await asyncio.sleep(0.01)

    asyncio.run(main())
    assert len(started) < 100
    assert cancelled and set(cancelled) == set(started[1:])  # nothing queued behind it keeps running
