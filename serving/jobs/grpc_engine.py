"""The gRPC engine of batch jobs: classify a whole data set through ClassifyStream on one or more servers.

Images go out in requests of --batch-size, at most --window requests in flight per stream, one stream per
server address, requests dealt round robin over the streams. Rows are appended to the output as answers
arrive, so an interrupted job resumes where it stopped: ids already in the output are skipped and a
half-written last line is dropped and redone. Every request names the version the job started with, and
an answer from any other is refused, so the rows of one output come from one model version even when the
servers swap versions under the job (`output.py` records it, and refuses to resume with another). A
stream that breaks is reopened; an address that keeps failing is dropped and its requests go to the others.
Waits between tries follow the client's retry policy (client/retry.py: backoff with jitter), the one gRPC
applies to the calls it retries itself.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from ..cli_support import comma_list
from ..client import RETRYABLE, AsyncClassifierClient, ModelInfo, connection
from ..client.tracecontext import job_span
from .errors import BatchError
from .output import Output, WrittenWith, cam_file_name
from .report import finish_report, summarize, unfinished, worst_mistakes
from .rows import Truth, error_row, positions_to_do, prediction_rows
from .sources import Source, open_source, resolve_labels

# Per-request errors worth sending again: the client's retryable ones, and a replica that is busy (a full
# queue, an aborted call), which a job waits out where an interactive caller would rather hear of it.
REQUEST_RETRYABLE = RETRYABLE | {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED}
# A whole stream that breaks (or goes silent past the deadline) is reopened on the same address. INTERNAL is
# among them for the stream as a whole: a request's own failure comes inside the stream as its error code,
# so a stream ending INTERNAL was cut on the way (a proxy resets it with RST_STREAM when its replica dies).
# Reopening resends only what was not answered, and --retries bounds it.
STREAM_RETRYABLE = REQUEST_RETRYABLE | {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL}
_STATUS_BY_VALUE = {c.value[0]: c for c in grpc.StatusCode}


@dataclass
class _Request:
    request_id: str
    positions: np.ndarray
    attempts: int = 0


@dataclass
class JobOptions:
    top_k: int = 5
    batch_size: int = 64
    window: int = 8
    timeout_s: float = 30.0
    retries: int = 3
    cam_dir: Path | None = None
    cam_mistakes_only: bool = False
    progress: bool = True


@dataclass
class RunStats:
    images: int = 0
    seconds: float = 0.0
    retired: list[str] = field(default_factory=list)


class StreamJob:
    """Deals requests round robin over one ClassifyStream per target and writes every answer."""

    def __init__(self, client: AsyncClassifierClient, source: Source, info: ModelInfo, truth: Truth,
                 output: Output, todo: np.ndarray, done: int, options: JobOptions):
        self.client, self.source, self.info, self.output, self.o = client, source, info, output, options
        self.truth = truth
        self.queues: list[collections.deque[_Request]] = [collections.deque() for _ in client.targets]
        for n, start in enumerate(range(0, len(todo), options.batch_size)):
            self.queues[n % len(self.queues)].append(_Request(str(n), todo[start:start + options.batch_size]))
        self.live = list(range(len(self.queues)))
        self.stats = RunStats()
        self._cam_slots = asyncio.Semaphore(max(2, options.window))
        self._writes: list[asyncio.Task] = []          # explanations (then rows) not yet written
        self._last_write: dict[int, asyncio.Task] = {}  # per stream, so its rows keep the order answered
        self._bar = None
        self._total, self._initial = len(source), done

    async def run(self) -> RunStats:
        from tqdm import tqdm
        started = time.perf_counter()
        self._bar = tqdm(total=self._total, initial=self._initial, unit="img", disable=None if self.o.progress else True,
                         smoothing=0.1, dynamic_ncols=True)
        try:
            while todo := [i for i in self.live if self.queues[i]]:
                try:
                    async with asyncio.TaskGroup() as group:
                        for i in todo:
                            group.create_task(self._stream(i))
                except ExceptionGroup as eg:  # the first failure tells the story; the rest are its echoes
                    raise eg.exceptions[0] from None
            await asyncio.gather(*self._writes)
        finally:
            self._bar.close()
            self.stats.seconds = time.perf_counter() - started
        return self.stats

    async def _stream(self, i: int) -> None:
        queue, target, failures = self.queues[i], self.client.targets[i], 0
        while queue and i in self.live:
            in_flight: collections.deque[_Request] = collections.deque()
            responses = self.client.classify_stream_messages(self._feed(queue, in_flight), model=self.info.name,
                                                             version=self.info.version, top_k=self.o.top_k,
                                                             window=self.o.window, target_index=i)
            try:
                while True:
                    try:
                        # A silent stream past the deadline is treated like a broken one.
                        async with asyncio.timeout(self.o.timeout_s):
                            response = await anext(responses)
                    except StopAsyncIteration:
                        break
                    request = in_flight.popleft()
                    if response.request_id != request.request_id:
                        raise BatchError(f"{target} answered request {response.request_id!r} where "
                                         f"{request.request_id!r} was due")
                    failures = 0
                    await self._answer(i, request, response)
            except (grpc.aio.AioRpcError, TimeoutError) as e:
                code = e.code() if isinstance(e, grpc.aio.AioRpcError) else grpc.StatusCode.DEADLINE_EXCEEDED
                detail = e.details() if isinstance(e, grpc.aio.AioRpcError) else f"no answer in {self.o.timeout_s:g}s"
                if code not in STREAM_RETRYABLE:
                    raise BatchError(f"{target}: {code.name}: {detail}") from None
                queue.extendleft(reversed(in_flight))  # unanswered requests go again, first
                failures += 1
                if failures > self.o.retries:
                    self._retire(i, f"{code.name}: {detail}")
                    return
                await asyncio.sleep(self.client.policy.delay(failures))
            finally:
                await responses.aclose()

    async def _feed(self, queue: collections.deque[_Request], in_flight: collections.deque[_Request]):
        while queue:
            request = queue.popleft()
            in_flight.append(request)  # before it is sent, so a broken stream knows what to redo
            yield request.request_id, self.source.images(request.positions)

    @property
    def _gone(self) -> str:
        """What to do when the job's model version stops answering: its rows are that version's."""
        return (f"the output holds {self.info.name} v{self.info.version}'s rows: run again once it is served, or "
                f"with --fresh to start over with the version served now")

    def _retire(self, i: int, reason: str) -> None:
        """A target that keeps failing hands its requests to the others."""
        target = self.client.targets[i]
        self.live.remove(i)
        self.stats.retired.append(f"{target} ({reason})")
        if not self.live:
            raise BatchError(f"every server failed; last: {target}: {reason}")
        print(f"\nwarning: giving up on {target} after {self.o.retries} retries ({reason}); its "
              f"{len(self.queues[i])} requests go to the other servers", file=sys.stderr)
        for n, request in enumerate(self.queues[i]):
            self.queues[self.live[n % len(self.live)]].append(request)
        self.queues[i].clear()

    async def _answer(self, i: int, request: _Request, response) -> None:
        queue = self.queues[i]
        if response.error_code:
            code = _STATUS_BY_VALUE.get(response.error_code, grpc.StatusCode.UNKNOWN)
            if code == grpc.StatusCode.NOT_FOUND:  # the job's model version is gone: no image's fault
                raise BatchError(f"{self.client.targets[i]}: NOT_FOUND: {response.error_message}; {self._gone}")
            if code in REQUEST_RETRYABLE:
                request.attempts += 1
                if request.attempts > self.o.retries:
                    raise BatchError(f"request {request.request_id}: {code.name} after {self.o.retries} retries: "
                                     f"{response.error_message}")
                await asyncio.sleep(self.client.policy.delay(request.attempts))
                queue.appendleft(request)
            elif len(request.positions) > 1:
                # One bad image fails its whole request: resend one by one to find it and keep the rest.
                queue.extendleft(reversed([_Request(f"{request.request_id}.{j}", request.positions[j:j + 1])
                                           for j in range(len(request.positions))]))
            else:
                pos = int(request.positions[0])
                self._write([error_row(self.source, pos, code.name, response.error_message)])
            return
        reply = response.response
        if (reply.model, reply.version) != (self.info.name, self.info.version):
            raise BatchError(f"{self.client.targets[i]} answered with {reply.model} v{reply.version}; {self._gone}")
        labels = [[p.label for p in result.predictions] for result in reply.results]
        scores = [[p.score for p in result.predictions] for result in reply.results]
        predicted = np.array([result.predictions[0].index for result in reply.results], np.int64)
        if len(labels) != len(request.positions):
            raise BatchError(f"request {request.request_id}: {len(labels)} results for {len(request.positions)} images")
        rows, mistake = prediction_rows(self.source, request.positions, labels, scores, predicted, self.truth)
        if self.o.cam_dir is None:
            self._write(rows)
            return
        wanted = mistake if self.o.cam_mistakes_only else np.ones(len(rows), bool)
        for task in [t for t in self._writes if t.done()]:
            self._writes.remove(task)
            task.result()  # a failed explanation stops the job here rather than at the end
        await self._cam_slots.acquire()  # bounds the explanations pending, which holds back the stream
        task = asyncio.create_task(self._explain_then_write(request.positions[wanted], rows, wanted,
                                                            self._last_write.get(i)))
        self._writes.append(task)
        self._last_write[i] = task

    async def _explain_then_write(self, positions: np.ndarray, rows: list[dict], wanted: np.ndarray,
                                  after: asyncio.Task | None) -> None:
        """CAM files first, then the rows: a resumed job never skips an image whose overlay is missing."""
        try:
            if len(positions):
                try:
                    explanations = await self.client.explain(self.source.images(positions), model=self.info.name,
                                                             version=self.info.version, overlay=True)
                except grpc.aio.AioRpcError as e:  # not the stream's failure: stop, the rows stay to be redone
                    raise BatchError(f"Explain failed: {e.code().name}: {e.details()}") from None
                for j, e in zip(np.flatnonzero(wanted).tolist(), explanations, strict=True):
                    path = self.o.cam_dir / cam_file_name(rows[j]["id"])
                    path.write_bytes(e.overlay_png)
                    rows[j]["cam"] = str(path)
            if after is not None:
                await after
            self._write(rows)
        finally:
            self._cam_slots.release()

    def _write(self, rows: list[dict]) -> None:
        self.output.append(rows)
        self.stats.images += len(rows)
        self._bar.update(len(rows))


async def run_job(args: argparse.Namespace) -> int:
    # With OpenTelemetry configured (OTEL_* variables, the [trace] extra), the job is one span and every
    # call of it carries its trace context.
    with job_span("batch job", model=args.model or "", servers=args.server):
        return await _run_job(args)


async def _run_job(args: argparse.Namespace) -> int:
    source = open_source(args)
    targets = comma_list(args.server)
    tls, token = connection.from_arguments(args)
    async with AsyncClassifierClient(targets, timeout_s=args.timeout, retries=args.retries, tls=tls,
                                     token=token) as client:
        info = await client.get_model(args.model, args.model_version)
        top_k = max(1, min(args.top_k, len(info.labels)))
        output = Output(args.output, top_k)
        written = output.begin(WrittenWith(info.name, info.version), fresh=args.fresh)
        todo, already = positions_to_do(source, written, args.stop_after)
        truth = Truth(*resolve_labels(source.labels, info.labels))
        cam_dir = Path(args.cam_dir) if args.cam_dir else None
        if cam_dir and not info.supports_cam:
            print(f"warning: {info.name} cannot explain ({info.cam_unsupported_reason}); no CAM overlays",
                  file=sys.stderr)
            cam_dir = None
        if cam_dir:
            cam_dir.mkdir(parents=True, exist_ok=True)
        if cam_dir and args.cam_mistakes_only and source.labels is None:
            print("warning: --cam-mistakes-only without labels: no image is known to be a mistake", file=sys.stderr)
        print(f"{source.description}: {len(source)} images, {already} done already, {len(todo)} to classify "
              f"with {info.name} v{info.version} on {len(targets)} server(s)", file=sys.stderr)
        options = JobOptions(top_k=top_k, batch_size=args.batch_size, window=args.window,
                             timeout_s=args.timeout, retries=args.retries, cam_dir=cam_dir,
                             cam_mistakes_only=args.cam_mistakes_only, progress=not args.no_progress)
        output.open()
        try:
            job = StreamJob(client, source, info, truth, output, todo, already, options)
            stats = await job.run()
        finally:
            output.close()
        rows = output.resume()
        if unfinished(rows, source):
            return 0
        summary = {"input": source.description, "output": str(output.path), "model": info.name,
                   "versions": [info.version],  # every row's: begin() and the answers' check see to it
                   "servers": targets, **summarize(rows, info.labels), "images_this_run": stats.images,
                   "seconds": round(stats.seconds, 3),
                   "images_per_second": round(stats.images / stats.seconds, 1) if stats.images else None}
        if stats.retired:
            summary["servers_given_up"] = stats.retired
        mistakes, positions = worst_mistakes(rows, source, args.sheet_size)
        finish_report(summary, info.labels, info.name, str(output.path), mistakes,
                      await _mistake_pictures(client, source, positions, info))
    return 0


async def _mistake_pictures(client: AsyncClassifierClient, source: Source, positions: np.ndarray,
                            info: ModelInfo) -> list:
    """CAM overlays of the mistakes (Explain, by the version that wrote the rows), or the inputs themselves when
    the model cannot explain."""
    if not len(positions):
        return []
    try:
        explanations = await client.explain(source.images(positions), model=info.name, version=info.version,
                                            overlay=True)
        return [e.overlay_png for e in explanations]
    except grpc.aio.AioRpcError as e:
        print(f"no CAM overlays on the mistakes sheet ({e.code().name}: {e.details()})", file=sys.stderr)
        return [source.picture(int(p)) for p in positions]
