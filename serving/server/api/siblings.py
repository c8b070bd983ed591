"""What crosses the workers of one server (`serve --workers N`): each worker is a whole server on the shared
port, and also listens on a private Unix socket (in the supervisor's 0700 directory) where its siblings reach it.

- A management call (model load and unload, trace and log settings) is applied by the worker that received it,
  then by every sibling, before it is answered: the server changes as one.
- ModelStatistics and RepositoryIndex gather every worker's answer: the statistics add up, and a version
  counts as READY only where every worker has it ready.
- Repository polling runs in worker 0 alone; after each scan it asks the siblings to scan too.
- What a replaced worker must know at its start (the models unloaded on request) is kept in the directory's
  `state.json`, written before the siblings are told.

The private socket carries no token: only this user can reach the directory, and the methods it serves are
the local halves of the calls above (the public port still checks every caller first). A sibling that is not
running (being replaced) is skipped: it reads `state.json` when it starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf import empty_pb2

from ...engine.errors import SiblingRefused
from ...wire.inference import grpc_service_pb2 as pb
from .status import status_of

log = logging.getLogger("serving.siblings")

SERVICE = "cnn_serving.internal.Siblings"
POLL = "Poll"
# Each method: (request, response) messages. The names are KServe's, whose local half each one runs.
METHODS = {
    "RepositoryModelLoad": (pb.RepositoryModelLoadRequest, pb.RepositoryModelLoadResponse),
    "RepositoryModelUnload": (pb.RepositoryModelUnloadRequest, pb.RepositoryModelUnloadResponse),
    "ModelStatistics": (pb.ModelStatisticsRequest, pb.ModelStatisticsResponse),
    "RepositoryIndex": (pb.RepositoryIndexRequest, pb.RepositoryIndexResponse),
    "TraceSetting": (pb.TraceSettingRequest, pb.TraceSettingResponse),
    "LogSettings": (pb.LogSettingsRequest, pb.LogSettingsResponse),
    POLL: (empty_pb2.Empty, empty_pb2.Empty),
}
READING_TIMEOUT_S = 10.0  # statistics and the index; management calls wait as long as the loading takes
_CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                    ("grpc.max_reconnect_backoff_ms", 1000), ("grpc.max_receive_message_length", 64 << 20)]

Handler = Callable[[object], Awaitable[object]]


@dataclass(frozen=True)
class WorkerRole:
    """One worker of `count`, with the supervisor's private directory."""
    index: int
    count: int
    directory: str

    def socket_path(self, index: int) -> Path:
        return Path(self.directory) / f"worker-{index}.sock"

    @property
    def polls(self) -> bool:
        return self.index == 0

    @property
    def siblings(self) -> list[int]:
        return [i for i in range(self.count) if i != self.index]

    # -- what a replaced worker must know ------------------------------------------------------------------
    def unloaded(self) -> set[str]:
        """The models unloaded on request, as the management calls left them."""
        path = Path(self.directory) / "state.json"
        try:
            return set(json.loads(path.read_text())["unloaded"])
        except FileNotFoundError:
            return set()

    def note(self, loaded: str = "", unloaded: str = "") -> None:
        """Record a load or an unload on request (under a lock: two workers may be told at once)."""
        directory = Path(self.directory)
        with open(directory / "state.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            names = self.unloaded()
            names.discard(loaded)
            if unloaded:
                names.add(unloaded)
            tmp = directory / f"state.{os.getpid()}.tmp"
            tmp.write_text(json.dumps({"unloaded": sorted(names)}))
            tmp.replace(directory / "state.json")


class Siblings:
    """The calls one worker makes to every other worker."""

    def __init__(self, role: WorkerRole):
        self.role = role
        self._channels: dict[int, grpc.aio.Channel] = {}

    def _call(self, index: int, method: str):
        channel = self._channels.get(index)
        if channel is None:
            channel = grpc.aio.insecure_channel(f"unix:{self.role.socket_path(index)}", options=_CHANNEL_OPTIONS)
            self._channels[index] = channel
        request_type, response_type = METHODS[method]
        return channel.unary_unary(f"/{SERVICE}/{method}", request_serializer=request_type.SerializeToString,
                                   response_deserializer=response_type.FromString)

    async def _one(self, index: int, method: str, request, timeout: float | None):
        try:
            return await self._call(index, method)(request, timeout=timeout)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNAVAILABLE and self._not_running(e):
                log.info("worker %d is not running (being replaced?): %s skipped there", index, method)
                return None
            raise SiblingRefused(e.code().name, e.details() or f"worker {index}: {e.code().name}") from None

    @staticmethod
    def _not_running(e: grpc.aio.AioRpcError) -> bool:
        details = (e.details() or "").lower()
        return "connect" in details or "no such file" in details or "socket closed" in details

    async def ask(self, method: str, request, timeout: float | None = READING_TIMEOUT_S) -> list:
        """Every running sibling's answer (those not running are left out); a sibling's error is raised with the
        status it gave."""
        answers = await asyncio.gather(*(self._one(i, method, request, timeout) for i in self.role.siblings))
        return [a for a in answers if a is not None]

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()


class SiblingServer:
    """The private socket where the siblings reach this worker's local half of each call."""

    def __init__(self, role: WorkerRole, handlers: dict[str, Handler]):
        self.role, self.handlers = role, handlers
        self.server: grpc.aio.Server | None = None

    @staticmethod
    def _method(method: str, handler: Handler) -> grpc.RpcMethodHandler:
        request_type, response_type = METHODS[method]

        async def unary(request, context):
            try:
                return await handler(request)
            except Exception as e:  # noqa: BLE001 - the sibling gets the status the caller would
                await context.abort(*status_of(e))

        return grpc.unary_unary_rpc_method_handler(unary, request_deserializer=request_type.FromString,
                                                   response_serializer=response_type.SerializeToString)

    async def start(self) -> None:
        path = self.role.socket_path(self.role.index)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # left by the worker this one replaces
        self.server = grpc.aio.server(options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 64 << 20)])
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            SERVICE, {m: self._method(m, h) for m, h in self.handlers.items()}),))
        if self.server.add_insecure_port(f"unix:{path}") == 0:
            raise OSError(f"cannot listen on the private socket {path}")
        await self.server.start()

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(0)
            self.server = None


# -- the whole server's answers from every worker's ------------------------------------------------------------
def _add_duration(into: pb.StatisticDuration, other: pb.StatisticDuration) -> None:
    into.count += other.count
    into.ns += other.ns


_INFER_FIELDS = [f.name for f in pb.InferStatistics.DESCRIPTOR.fields]
_BATCH_PHASES = ("compute_input", "compute_infer", "compute_output")


def merge_statistics(answers: list[pb.ModelStatisticsResponse]) -> pb.ModelStatisticsResponse:
    """The statistics of the whole server: every count and duration summed per model version (the batch
    statistics per batch size), the last inference the latest of any worker."""
    merged: dict[tuple[str, str], pb.ModelStatistics] = {}
    batches: dict[tuple[str, str], dict[int, pb.InferBatchStatistics]] = {}
    for answer in answers:
        for s in answer.model_stats:
            key = (s.name, s.version)
            if key not in merged:
                merged[key] = pb.ModelStatistics(name=s.name, version=s.version)
                batches[key] = {}
            into = merged[key]
            into.last_inference = max(into.last_inference, s.last_inference)
            into.inference_count += s.inference_count
            into.execution_count += s.execution_count
            for name in _INFER_FIELDS:
                _add_duration(getattr(into.inference_stats, name), getattr(s.inference_stats, name))
            for b in s.batch_stats:
                size = batches[key].setdefault(b.batch_size, pb.InferBatchStatistics(batch_size=b.batch_size))
                for phase in _BATCH_PHASES:
                    _add_duration(getattr(size, phase), getattr(b, phase))
    for key, into in merged.items():
        into.batch_stats.extend(batches[key][size] for size in sorted(batches[key]))
    return pb.ModelStatisticsResponse(model_stats=list(merged.values()))


def merge_index(answers: list[pb.RepositoryIndexResponse], ready_only: bool) -> pb.RepositoryIndexResponse:
    """The repository of the whole server: one entry per model version, READY only where every worker has it
    ready (otherwise the first other state a worker gives, with its reason). Every answer is a full index."""
    merged: dict[tuple[str, str], pb.RepositoryIndexResponse.ModelIndex] = {}
    counts: dict[tuple[str, str], int] = {}
    for answer in answers:
        for m in answer.models:
            key = (m.name, m.version)
            counts[key] = counts.get(key, 0) + 1
            if key not in merged or (merged[key].state == "READY" and m.state != "READY"):
                merged[key] = m
    models = []
    for key, m in merged.items():
        if m.state == "READY" and counts[key] < len(answers):  # a worker that does not know it yet
            m = pb.RepositoryIndexResponse.ModelIndex(name=m.name, version=m.version, state="LOADING",
                                                      reason="not ready on every worker yet")
        if not ready_only or m.state == "READY":
            models.append(m)
    return pb.RepositoryIndexResponse(models=models)

