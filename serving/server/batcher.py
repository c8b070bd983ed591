"""A generic dynamic batcher: concurrent requests in, few large executions, results back to each caller.

It knows nothing of gRPC or onnxruntime: `execute(payloads, instance) -> results` runs in a worker thread
(one per instance, `instance` its index) over a list of request payloads, each supporting `len()` (its
units: images, for the server) and slicing. Scheduling follows Triton's dynamic batcher: requests queue
in arrival order per priority level; a batch leaves when it reaches `max_batch_size` units (or the
largest preferred size available) or when the oldest request has waited `max_queue_delay`, and while
callers overlap it first lets the event loop turn a few times to take in what arrived meanwhile; a request
larger than the limit is split into chunks and merged back in order. The queue is bounded (QueueFull at
once when full); requests whose deadline passes in the queue are dropped and answered DeadlineExceeded;
a cancelled caller frees its slot.

Two optional hooks watch it without shaping it: an `observer`, told of every batch, answered request, full
queue and expired deadline (the statistics live there: `statistics.py`), and a `tracer`, which captures each
request's trace context at submit and is told of every batch that served a traced request, with its
timestamps, after the batch ran.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from ..engine.errors import BatcherStopped, DeadlineExceeded, InvalidInput, QueueFull

# Event-loop turns a batch waits for more requests while callers overlap (`DynamicBatcher._gather`). With two
# workers on two cores at 64 callers, none gave 1.3-1.6 requests per batch and 10 gave 5.3-5.5, for 25-35%
# more answers per second, a lone caller unchanged (docs/performance.md, workers; 16 gained nothing more).
GATHER_TURNS = 10


@dataclass(eq=False)
class _Pending:
    payload: Any
    size: int
    future: asyncio.Future
    enqueued: float
    deadline: float | None
    priority: int
    taken: bool = False   # handed to a worker (no longer in a queue)
    queued_s: float = 0.0                                 # set when its batch starts
    phases: tuple[float, float, float] = (0.0, 0.0, 0.0)  # set when its batch has run
    trace: Any = None     # what the tracer captured at submit (None: not traced)


def _concat_lists(parts: list) -> Any:
    return [x for part in parts for x in part]


class BatchObserver(Protocol):
    """What the batcher tells of its work (statistics are kept there, never here)."""

    def queue_full(self) -> None:
        """A request was refused at once: the queue was full."""

    def deadline_passed(self) -> None:
        """A queued request was dropped: its deadline passed."""

    def batch(self, units: int, queue_times: list[float], compute_s: float, phases: tuple[float, float, float],
              errors: list[BaseException]) -> None:
        """One execution: its units, each request's queue time, its compute time and phases (input, infer,
        output: what `execute` reported as `.phases`, else all of it as infer), the errors it answered."""

    def request(self, total_s: float, queue_s: float, phases: tuple[float, float, float]) -> None:
        """One request answered successfully: submit to answer, its queue time (its first chunk's), and the
        sum of its chunks' phases."""


class BatchTracer(Protocol):
    def capture(self) -> Any:
        """The submitting caller's trace context, or None when it is not traced (called on every submit)."""

    def batch_ran(self, name: str, traces: list, enqueued_ns: list[int], started_ns: int, ended_ns: int, units: int,
                  phases: tuple[float, float, float], failures: int, error: BaseException | None) -> None:
        """A batch that served at least one traced request ran (wall-clock ns timestamps)."""


class DynamicBatcher:
    def __init__(
        self,
        execute: Callable[[list[Any], int], Sequence[Any]],
        *,
        max_batch_size: int,
        max_queue_delay_s: float = 0.0,
        preferred_batch_sizes: Sequence[int] = (),
        max_queue_size: int = 1024,
        priority_levels: int = 1,
        default_priority: int = 1,
        instances: int = 1,
        merge: Callable[[list[Any]], Any] = _concat_lists,
        observer: BatchObserver | None = None,
        tracer: BatchTracer | None = None,
        inline_max_units: int = 0,
        inline_lone_window_s: float = 0.1,
        gather_turns: int = GATHER_TURNS,
        combine: bool = True,
        name: str = "batcher",
    ):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self._execute = execute
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.preferred = sorted(s for s in preferred_batch_sizes if 0 < s <= max_batch_size)
        self.max_queue_size = max_queue_size
        self.priority_levels = max(1, priority_levels)
        self.default_priority = min(max(1, default_priority), self.priority_levels)
        self.instances = max(1, instances)
        self.combine = combine  # False: every request is a batch of its own (still split at max_batch_size)
        self._merge = merge
        self._observer = observer
        self._tracer = tracer
        self._wall_offset_s = time.time() - time.monotonic()  # monotonic to wall-clock, for span timestamps
        # Batches up to inline_max_units run on the event loop itself, but only for a lone caller: when no
        # two requests overlapped within inline_lone_window_s. With several callers the loop must keep
        # reading requests while the model runs, or it would see them one at a time and run tiny batches.
        self.inline_max_units = inline_max_units
        self.inline_lone_window_s = inline_lone_window_s
        self.gather_turns = gather_turns
        self._waiting = 0            # submitted and not yet answered
        self._overlap_seen = -math.inf  # when two requests were last in the batcher at once
        self.name = name
        self._queues: list[collections.deque[_Pending]] = [collections.deque() for _ in range(self.priority_levels)]
        self._queued = 0
        self._arrival: asyncio.Event | None = None
        self._form_lock: asyncio.Lock | None = None
        self._workers: list[asyncio.Task] = []
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False
        self.in_flight = 0
        self._sweep_timer: asyncio.TimerHandle | None = None
        self._sweep_at = math.inf

    # -- lifecycle -------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._arrival = asyncio.Event()
        self._form_lock = asyncio.Lock()
        self._executor = ThreadPoolExecutor(self.instances, thread_name_prefix=f"{self.name}-exec")
        self._workers = [asyncio.create_task(self._worker(i), name=f"{self.name}-{i}") for i in range(self.instances)]

    async def stop(self, drain: bool = True, timeout_s: float = 30.0) -> None:
        """Stop taking requests; with drain, finish what is queued or running first."""
        self._closed = True
        if drain:
            end = time.monotonic() + timeout_s
            while (self._queued or self.in_flight) and time.monotonic() < end:
                await asyncio.sleep(0.005)
        for q in self._queues:
            while q:
                p = q.popleft()
                p.taken = True
                if not p.future.done():
                    p.future.set_exception(BatcherStopped(f"{self.name} is shutting down"))
        self._queued = 0
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()
        for w in self._workers:
            w.cancel()
        for w in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await w
        if self._executor:
            self._executor.shutdown(wait=True)

    @property
    def queued(self) -> int:
        return self._queued

    # -- submitting ------------------------------------------------------------------------------------
    async def submit(self, payload: Any, priority: int | None = None, timeout_s: float | None = None) -> Any:
        """Queue one request (any number of units), wait for its results, merged in order."""
        if self._closed or self._arrival is None:
            raise BatcherStopped(f"{self.name} is not accepting requests")
        size = len(payload)
        if size == 0:
            return self._merge([])
        level = self.default_priority if not priority else priority
        if not 1 <= level <= self.priority_levels:
            raise InvalidInput(f"priority {priority} is outside 1..{self.priority_levels}")
        limit = self.max_batch_size
        chunks = [payload] if size <= limit else [payload[i:i + limit] for i in range(0, size, limit)]
        if self._queued + len(chunks) > self.max_queue_size:
            if self._observer:
                self._observer.queue_full()
            raise QueueFull(f"{self.name}: queue is full ({self._queued} of {self.max_queue_size} requests waiting)")
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        deadline = now + timeout_s if timeout_s else None
        pending = [_Pending(c, len(c), loop.create_future(), now, deadline, level) for c in chunks]
        if self._tracer is not None:
            trace = self._tracer.capture()
            if trace is not None:
                for p in pending:
                    p.trace = trace
        self._queues[level - 1].extend(pending)
        self._queued += len(pending)
        self._waiting += 1
        if self._waiting > 1:
            self._overlap_seen = now
        self._arrival.set()
        if deadline is not None and deadline < self._sweep_at:
            self._arm_sweep(loop, deadline)
        try:
            if len(pending) == 1:
                result = await pending[0].future
            else:
                result = self._merge(list(await asyncio.gather(*(p.future for p in pending))))
        finally:
            self._waiting -= 1
            self._forget(pending)
        self._count_success(pending, time.monotonic() - now)
        return result

    def _count_success(self, pending: list[_Pending], total_s: float) -> None:
        if self._observer:
            phases = tuple(sum(p.phases[i] for p in pending) for i in range(3))
            self._observer.request(total_s, min(p.queued_s for p in pending), phases)

    def _arm_sweep(self, loop: asyncio.AbstractEventLoop, at: float) -> None:
        """One timer per batcher, at the earliest deadline in the queue: callers usually share a timeout,
        so deadlines arrive in order and most requests arm nothing (a timer per request costs more)."""
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()
        self._sweep_at = at
        self._sweep_timer = loop.call_later(max(0.0, at - time.monotonic()), self._sweep_expired)

    def _sweep_expired(self) -> None:
        """Answer DeadlineExceeded to every queued request past its deadline; re-arm for the next one."""
        self._sweep_timer, self._sweep_at = None, math.inf
        now, earliest = time.monotonic(), math.inf
        for q in self._queues:
            keep = []
            for p in q:
                if p.deadline is not None and p.deadline <= now:
                    self._drop_expired(p, "deadline passed while queued")
                    continue
                keep.append(p)
                if p.deadline is not None:
                    earliest = min(earliest, p.deadline)
            if len(keep) != len(q):
                q.clear()
                q.extend(keep)
        if earliest < math.inf:
            self._arm_sweep(asyncio.get_running_loop(), earliest)

    def _drop_expired(self, p: _Pending, why: str) -> None:
        p.taken = True
        self._queued -= 1
        if self._observer:
            self._observer.deadline_passed()
        if not p.future.done():
            p.future.set_exception(DeadlineExceeded(f"{self.name}: {why}"))

    def _forget(self, pending: list[_Pending]) -> None:
        """Take requests nobody waits for any more (cancelled, or a sibling chunk failed) out of the queue."""
        for p in pending:
            p.future.cancel()  # no-op once answered; a taken chunk still running is then skipped
            if p.taken:
                continue
            try:
                self._queues[p.priority - 1].remove(p)
                self._queued -= 1
                p.taken = True
            except ValueError:
                pass  # already gone from the queue

    # -- scheduling ------------------------------------------------------------------------------------
    def _available_units(self) -> int:
        return sum(p.size for q in self._queues for p in q)

    def _oldest(self) -> float | None:
        heads = [q[0].enqueued for q in self._queues if q]
        return min(heads) if heads else None

    async def _next_batch(self) -> list[_Pending]:
        assert self._arrival is not None
        while True:
            while not self._queued:
                self._arrival.clear()
                await self._arrival.wait()
            if self.max_queue_delay_s > 0:
                target = self.preferred[-1] if self.preferred else self.max_batch_size
                while self._queued and self._available_units() < target:
                    oldest = self._oldest()
                    remaining = oldest + self.max_queue_delay_s - time.monotonic() if oldest else 0
                    if remaining <= 0:
                        break
                    self._arrival.clear()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._arrival.wait(), remaining)
            if self.gather_turns and time.monotonic() - self._overlap_seen <= self.inline_lone_window_s:
                await self._gather()
            batch = self._take()
            if batch:
                return batch

    async def _gather(self) -> None:
        """Let the event loop turn a few times before a batch is taken, while callers overlap: gRPC hands the
        loop requests a few at a time, so each turn brings the requests that arrived meanwhile into this batch.
        A lone caller never waits here; a full batch stops the gathering."""
        for _ in range(self.gather_turns):
            if self._available_units() >= self.max_batch_size:
                return
            await asyncio.sleep(0)

    def _take(self) -> list[_Pending]:
        limit = self.max_batch_size
        if self.preferred:
            available = self._available_units()
            fitting = [s for s in self.preferred if s <= available]
            if fitting and available < self.max_batch_size:
                limit = fitting[-1]
        now = time.monotonic()
        batch, units = [], 0
        for q in self._queues:  # highest priority (level 1) first, arrival order within a level
            while q:
                p = q[0]
                if p.future.done():  # cancelled by its caller, or expired
                    q.popleft()
                    p.taken = True
                    self._queued -= 1
                    continue
                if p.deadline is not None and p.deadline <= now:
                    q.popleft()
                    self._drop_expired(p, "deadline passed while queued")
                    continue
                if units + p.size > limit and batch:
                    return batch
                q.popleft()
                p.taken = True
                self._queued -= 1
                batch.append(p)
                units += p.size
                if units >= limit or not self.combine:
                    return batch
        return batch

    async def _worker(self, index: int) -> None:
        loop = asyncio.get_running_loop()
        assert self._form_lock is not None
        while True:
            async with self._form_lock:
                batch = await self._next_batch()
            units = sum(p.size for p in batch)
            started = time.monotonic()
            queue_times = [started - p.enqueued for p in batch]
            self.in_flight += len(batch)
            batch_error = None
            try:
                payloads = [p.payload for p in batch]
                if units <= self.inline_max_units and started - self._overlap_seen > self.inline_lone_window_s:
                    # Cheap enough to run on the event loop: two thread hops would cost more than the work.
                    results = self._execute(payloads, index)
                else:
                    results = await loop.run_in_executor(self._executor, self._execute, payloads, index)
                if len(results) != len(batch):
                    raise RuntimeError(f"execute returned {len(results)} results for {len(batch)} requests")
            except Exception as e:  # noqa: BLE001 - the whole batch failed: every caller hears why
                results = [e] * len(batch)
                batch_error = e
            finally:
                self.in_flight -= len(batch)
            compute = time.monotonic() - started
            phases = getattr(results, "phases", None) or (0.0, compute, 0.0)
            errors = [r for r in results if isinstance(r, BaseException)]
            failed = len(errors)
            if self._observer:
                self._observer.batch(units, queue_times, compute, phases, errors)
            if self._tracer is not None and any(p.trace is not None for p in batch):
                to_ns, offset = 1e9, self._wall_offset_s
                self._tracer.batch_ran(self.name, [p.trace for p in batch],
                                       [int((p.enqueued + offset) * to_ns) for p in batch], int((started + offset) * to_ns),
                                       int((started + compute + offset) * to_ns), units, phases, failed, batch_error)
            for p, queued, r in zip(batch, queue_times, results):
                p.queued_s, p.phases = queued, phases
                if p.future.done():
                    continue
                if isinstance(r, BaseException):
                    p.future.set_exception(r)
                else:
                    p.future.set_result(r)
