"""The dynamic batcher alone: no gRPC, no onnxruntime."""

import asyncio
import threading
import time

import pytest

from serving.engine.errors import DeadlineExceeded, QueueFull
from serving.server.batcher import DynamicBatcher
from serving.server.statistics import VersionStatistics


class Recorder:
    """execute() that echoes each unit doubled and records the batches it saw."""

    def __init__(self, delay_s: float = 0.0, gate: threading.Event | None = None):
        self.batches: list[list[list[int]]] = []
        self.delay_s, self.gate = delay_s, gate

    def __call__(self, payloads, instance):
        if self.gate is not None:
            self.gate.wait(5)
        time.sleep(self.delay_s)
        self.batches.append([list(p) for p in payloads])
        return [[2 * x for x in p] for p in payloads]


def run(coro):
    return asyncio.run(coro)


def test_concurrent_requests_are_batched_and_answered_in_order():
    rec = Recorder(delay_s=0.02)

    async def main():
        stats = VersionStatistics()
        b = DynamicBatcher(rec, max_batch_size=8, observer=stats)
        await b.start()
        results = await asyncio.gather(*(b.submit([i]) for i in range(20)))
        await b.stop()
        return results, stats

    results, stats = run(main())
    assert results == [[2 * i] for i in range(20)]
    assert max(sum(len(p) for p in batch) for batch in rec.batches) == 8
    assert stats.executions < 20 and stats.units == 20


def test_large_request_is_split_and_merged():
    rec = Recorder()

    async def main():
        b = DynamicBatcher(rec, max_batch_size=4)
        await b.start()
        out = await b.submit(list(range(10)))
        await b.stop()
        return out

    assert run(main()) == [2 * x for x in range(10)]
    assert all(sum(len(p) for p in batch) <= 4 for batch in rec.batches)


def test_queue_delay_waits_for_a_fuller_batch():
    rec = Recorder()

    async def main():
        b = DynamicBatcher(rec, max_batch_size=4, max_queue_delay_s=0.2)
        await b.start()
        first = asyncio.create_task(b.submit([1]))
        await asyncio.sleep(0.02)
        rest = [asyncio.create_task(b.submit([i])) for i in (2, 3, 4)]
        await asyncio.gather(first, *rest)
        await b.stop()

    run(main())
    assert rec.batches[0] == [[1], [2], [3], [4]]  # one full batch, not four small ones


def test_queue_full_is_rejected_at_once():
    gate = threading.Event()
    rec = Recorder(gate=gate)

    async def main():
        stats = VersionStatistics()
        b = DynamicBatcher(rec, max_batch_size=1, max_queue_size=3, observer=stats)
        await b.start()
        running = asyncio.create_task(b.submit([0]))  # taken by the worker, blocked on the gate
        await asyncio.sleep(0.05)
        queued = [asyncio.create_task(b.submit([i])) for i in (1, 2, 3)]
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull):
            await b.submit([4])
        gate.set()
        await asyncio.gather(running, *queued)
        await b.stop()
        return stats.rejected

    assert run(main()) == 1


def test_deadline_while_queued_and_cancel_frees_slot():
    gate = threading.Event()
    rec = Recorder(gate=gate)

    async def main():
        b = DynamicBatcher(rec, max_batch_size=1, max_queue_size=2)
        await b.start()
        running = asyncio.create_task(b.submit([0]))
        await asyncio.sleep(0.05)
        with pytest.raises(DeadlineExceeded):
            await b.submit([1], timeout_s=0.05)
        assert b.queued == 0  # the expired request left the queue
        cancelled = asyncio.create_task(b.submit([2]))
        await asyncio.sleep(0.01)
        cancelled.cancel()
        await asyncio.sleep(0.01)
        assert b.queued == 0  # the cancelled caller freed its slot
        gate.set()
        await running
        await b.stop()

    run(main())
    assert [b for batch in rec.batches for b in batch] == [[0]]  # neither dropped request ran


def test_priority_levels_serve_urgent_first():
    gate = threading.Event()
    rec = Recorder(gate=gate)

    async def main():
        b = DynamicBatcher(rec, max_batch_size=1, priority_levels=2, default_priority=2)
        await b.start()
        first = asyncio.create_task(b.submit([0]))
        await asyncio.sleep(0.05)
        low = asyncio.create_task(b.submit([1]))
        high = asyncio.create_task(b.submit([2], priority=1))
        await asyncio.sleep(0.01)
        gate.set()
        await asyncio.gather(first, low, high)
        await b.stop()

    run(main())
    assert [batch[0][0] for batch in rec.batches] == [0, 2, 1]


def test_failures_reach_every_caller_of_the_batch():
    def broken(payloads, instance):
        raise RuntimeError("boom")

    async def main():
        b = DynamicBatcher(broken, max_batch_size=4)
        await b.start()
        outcomes = await asyncio.gather(*(b.submit([i]) for i in range(3)), return_exceptions=True)
        await b.stop()
        return outcomes

    assert all(isinstance(o, RuntimeError) for o in run(main()))


def test_overload_loses_no_request():
    """1,000 concurrent requests against a queue of 64: each is answered, rejected or expired, none lost."""
    rec = Recorder(delay_s=0.002)

    async def main():
        b = DynamicBatcher(rec, max_batch_size=8, max_queue_size=64)
        await b.start()
        outcomes = await asyncio.gather(*(b.submit([i], timeout_s=0.5) for i in range(1000)), return_exceptions=True)
        await b.stop()
        return outcomes

    outcomes = run(main())
    answered = [o for o in outcomes if isinstance(o, list)]
    rejected = [o for o in outcomes if isinstance(o, QueueFull)]
    expired = [o for o in outcomes if isinstance(o, DeadlineExceeded)]
    assert len(answered) + len(rejected) + len(expired) == 1000
    assert answered and rejected
    assert sorted(x for a in answered for x in a) == sorted(2 * x for b in rec.batches for p in b for x in p)


def test_a_shorter_deadline_arriving_later_expires_first():
    """One deadline timer per batcher, re-armed for an earlier deadline: B (50 ms) expires long before A (5 s)."""
    gate = threading.Event()
    rec = Recorder(gate=gate)

    async def main():
        b = DynamicBatcher(rec, max_batch_size=1)
        await b.start()
        running = asyncio.create_task(b.submit([0]))
        await asyncio.sleep(0.05)
        a = asyncio.create_task(b.submit([1], timeout_s=5))
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            await b.submit([2], timeout_s=0.05)
        waited = time.monotonic() - started
        assert b.queued == 1 and not a.done()  # A still waits its turn
        gate.set()
        await asyncio.gather(running, a)
        await b.stop()
        return waited

    assert run(main()) < 1.0
    assert [p for batch in rec.batches for p in batch] == [[0], [1]]


def test_small_batches_run_on_the_event_loop_only_for_a_lone_caller():
    threads = []

    def execute(payloads, instance):
        threads.append(threading.current_thread() is threading.main_thread())
        time.sleep(0.002)
        return list(payloads)

    async def main():
        b = DynamicBatcher(execute, max_batch_size=4, inline_max_units=4, inline_lone_window_s=0.05)
        await b.start()
        for i in range(3):  # a lone caller, one request at a time: inline
            await b.submit([i])
        lone = list(threads)
        threads.clear()
        await asyncio.gather(*(b.submit([i]) for i in range(12)))  # concurrent callers: worker thread
        crowded = list(threads)
        threads.clear()
        await b.submit([0])  # right after them: still the worker thread
        await asyncio.sleep(0.06)
        await b.submit([0])  # alone again for longer than the window: inline
        await b.stop()
        return lone, crowded, threads

    lone, crowded, after = run(main())
    assert lone == [True, True, True]
    assert len(crowded) == 3 and not any(crowded)
    assert after == [False, True]


def test_without_combining_every_request_is_its_own_batch():
    """What a config.pbtxt without dynamic_batching means in Triton: requests run one at a time."""
    rec = Recorder(delay_s=0.01)

    async def main():
        b = DynamicBatcher(rec, max_batch_size=4, combine=False)
        await b.start()
        results = await asyncio.gather(*(b.submit([i, i]) for i in range(5)), b.submit(list(range(6))))
        await b.stop()
        return results

    results = run(main())
    assert results[:5] == [[2 * i, 2 * i] for i in range(5)] and results[5] == [2 * x for x in range(6)]
    assert all(len(batch) == 1 for batch in rec.batches)  # never two requests in one execution
    assert sorted(len(batch[0]) for batch in rec.batches) == [2] * 6 + [4]  # the 6-unit one split at 4


async def _arrivals_one_per_turn(b: DynamicBatcher, n: int) -> list:
    """n callers that reach the batcher one loop turn after another, as gRPC hands requests to the loop."""
    async def caller(i: int):
        for _ in range(i):
            await asyncio.sleep(0)
        return await b.submit([i])
    return await asyncio.gather(*(caller(i) for i in range(n)))


@pytest.mark.parametrize("turns", [0, 10])
def test_overlapping_callers_arriving_turn_by_turn_are_gathered_into_one_batch(turns):
    rec = Recorder()

    async def main():
        b = DynamicBatcher(rec, max_batch_size=64, gather_turns=turns)
        await b.start()
        await asyncio.gather(b.submit([100]), b.submit([101]))  # two callers at once: the callers overlap
        rec.batches.clear()
        results = await _arrivals_one_per_turn(b, 8)
        await b.stop()
        return results

    assert run(main()) == [[2 * i] for i in range(8)]
    sizes = [sum(len(p) for p in batch) for batch in rec.batches]
    if turns:
        assert sizes == [8]  # every arrival within the turns the batch waited
    else:
        assert len(sizes) > 1  # without gathering the first batch leaves with the first arrivals


def test_a_lone_caller_is_not_held_for_gathering():
    """One caller, one request at a time: no overlap, so its batch leaves without the turns a gathering takes
    (counted by a task that turns the loop until the batch starts)."""
    turns = {"now": 0, "at_execute": []}

    def execute(payloads, instance):
        turns["at_execute"].append(turns["now"])
        return [[2 * x for x in p] for p in payloads]

    async def main():
        # Run on the loop itself (a lone caller's small batch), so that no thread waits for the GIL meanwhile.
        b = DynamicBatcher(execute, max_batch_size=64, gather_turns=1000, inline_max_units=64)
        await b.start()

        async def count_turns():
            while True:
                await asyncio.sleep(0)
                turns["now"] += 1

        counter = asyncio.create_task(count_turns())
        for i in range(3):
            started = turns["now"]
            assert await b.submit([i]) == [2 * i]
            turns["at_execute"][-1] -= started
        counter.cancel()
        await b.stop()

    run(main())
    assert max(turns["at_execute"]) < 50  # a gathering would have turned the loop 1000 times first
