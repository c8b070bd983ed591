"""inference.GRPCInferenceService (KServe v2 + Triton's extensions): a thin adapter between Triton's wire
messages and the model repository, so tritonclient and KServe tooling work unchanged. Message decoding is
in `tensors.py`, statistics in `statistics.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import metadata as package_metadata

import grpc

from ....engine.errors import InvalidInput, ModelNotFound, ModelNotReady, shown
from ....wire.inference import grpc_service_pb2 as pb
from ....wire.inference import grpc_service_pb2_grpc as pb_grpc
from ...logs import CONTROL, LogControl
from ...repository import READY, UNAVAILABLE, ModelRepository
from ...tracing import Tracing
from ..siblings import POLL, Siblings, merge_index, merge_statistics
from ..status import remaining_time, status_of
from ..streaming import STREAM_WINDOW, answer_in_order
from .metadata import model_metadata, served_config
from .settings import log_settings, trace_setting
from .statistics import model_statistics
from .tensors import build_response, inference_request, int_param, parse_version

SERVICE_NAME = "inference.GRPCInferenceService"
SERVER_NAME = "cnn-serving"
EXTENSIONS = ["classification", "model_configuration", "model_repository", "schedule_policy", "statistics",
              "parameters", "trace", "logging"]


def _server_version() -> str:
    try:
        return package_metadata.version(SERVER_NAME)
    except package_metadata.PackageNotFoundError:  # run from a checkout
        return "0.1.0"


def _timeout_s(request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> float | None:
    """The tighter of the request's `timeout` (microseconds, Triton's meaning) and the gRPC deadline."""
    limits = [remaining_time(context)]
    timeout_us = int_param(request.parameters, "timeout")
    if timeout_us is not None:
        if timeout_us < 0:
            raise InvalidInput(f"timeout {timeout_us} us is negative")
        limits.append(timeout_us / 1e6 if timeout_us else None)
    limits = [t for t in limits if t is not None]
    return min(limits) if limits else None


_SHARED_MEMORY_HINT = "send tensors in the request itself (raw_input_contents or contents)"


async def _unimplemented(context: grpc.aio.ServicerContext, what: str, instead: str) -> None:
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{what} is not supported by this server; {instead}")


class KServeService(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, repository: ModelRepository, readiness: Callable[[], tuple[bool, str]] | None = None,
                 tracing: Tracing | None = None, logs: LogControl | None = None, siblings: Siblings | None = None):
        self.repo = repository
        # The other workers of this server (`serve --workers N`): management calls and the statistics and index
        # span them all (api/siblings.py). None when this process is the whole server.
        self.siblings = siblings
        self.tracing, self.logs = tracing or Tracing(), logs or CONTROL
        # The server's readiness (strict by default), the same answer grpc.health.v1 gives.
        self.readiness = readiness or repository.readiness

    # -- health ----------------------------------------------------------------------------------------------
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.readiness()[0])

    async def ModelReady(self, request, context):
        version = parse_version(request.version)
        try:
            self.repo.get(request.name, version)
        except (ModelNotFound, ModelNotReady):
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    # -- metadata --------------------------------------------------------------------------------------------
    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=_server_version(), extensions=EXTENSIONS)

    async def ModelMetadata(self, request, context):
        mv = self.repo.get(request.name, parse_version(request.version))
        return model_metadata(mv, self.repo.ready_versions(mv.name))

    async def ModelConfig(self, request, context):
        mv = self.repo.get(request.name, parse_version(request.version))
        return pb.ModelConfigResponse(config=served_config(mv))

    # -- inference -------------------------------------------------------------------------------------------
    async def _infer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        if "sequence_id" in request.parameters:
            raise InvalidInput("sequence batching is not supported: these models are stateless")
        mv = self.repo.resolve(request.model_name, parse_version(request.model_version))
        inference, outputs = inference_request(request, mv)
        priority = int_param(request.parameters, "priority")
        # No await between resolving the version and queueing on its batcher, so a hot swap that retires
        # this version cannot slip in between: the request is queued before the batcher closes and is drained.
        result = await mv.infer(inference, priority=priority or None, timeout_s=_timeout_s(request, context))
        return build_response(request, mv, result, outputs)

    async def ModelInfer(self, request, context):
        return await self._infer(request, context)

    async def ModelStreamInfer(self, request_iterator, context):
        """Requests run concurrently (up to the window) and are answered in arrival order; a failed request
        is answered with error_message (its id kept) and the stream goes on."""
        async for msg, outcome in answer_in_order(request_iterator, lambda m: self._infer(m, context), STREAM_WINDOW):
            if isinstance(outcome, Exception):
                code, message = status_of(outcome)
                yield pb.ModelStreamInferResponse(
                    error_message=f"[{code}] {message}",
                    infer_response=pb.ModelInferResponse(model_name=msg.model_name, model_version=msg.model_version,
                                                         id=msg.id))
            else:
                yield pb.ModelStreamInferResponse(infer_response=outcome)

    # -- statistics ------------------------------------------------------------------------------------------
    async def ModelStatistics(self, request, context):
        here = await self._statistics_here(request)
        if self.siblings is None:
            return here
        return merge_statistics([here, *await self.siblings.ask("ModelStatistics", request)])

    async def _statistics_here(self, request: pb.ModelStatisticsRequest) -> pb.ModelStatisticsResponse:
        if request.name:
            version = parse_version(request.version)
            if version:
                versions = [self.repo.get(request.name, version)]
            else:
                self.repo.get(request.name)  # NOT_FOUND / UNAVAILABLE with the reason
                versions = [self.repo.get(request.name, v) for v in self.repo.ready_versions(request.name)]
        else:
            versions = sorted(self.repo.all_ready(), key=lambda mv: (mv.name, mv.version))
        return pb.ModelStatisticsResponse(model_stats=[model_statistics(mv) for mv in versions])

    # -- repository ------------------------------------------------------------------------------------------
    async def RepositoryIndex(self, request, context):
        if self.siblings is None:
            return await self._index_here(request)
        every = pb.RepositoryIndexRequest(repository_name=request.repository_name)  # READY is decided on the whole
        answers = [await self._index_here(every), *await self.siblings.ask("RepositoryIndex", every)]
        return merge_index(answers, ready_only=request.ready)

    async def _index_here(self, request: pb.RepositoryIndexRequest) -> pb.RepositoryIndexResponse:
        models = []
        names = sorted(set(self.repo.model_names()) | {s.name for s in self.repo.statuses()})
        for name in names:
            statuses = self.repo.statuses(name)
            if not statuses:  # never loaded: a bad config, or not tried yet
                if not request.ready:
                    reason = self.repo.model_error(name) or "not loaded"
                    models.append(pb.RepositoryIndexResponse.ModelIndex(name=name, state=UNAVAILABLE, reason=reason))
                continue
            for s in statuses:
                if request.ready and s.state != READY:
                    continue
                models.append(pb.RepositoryIndexResponse.ModelIndex(name=name, version=str(s.version), state=s.state,
                                                                    reason=s.reason or self.repo.model_error(name)))
        return pb.RepositoryIndexResponse(models=models)

    async def _everywhere(self, method: str, request, here):
        """A management call applied here, then by every sibling, before it is answered."""
        answer = await here(request)
        if self.siblings is not None:
            if method == "RepositoryModelLoad":
                self.siblings.role.note(loaded=request.model_name)
            elif method == "RepositoryModelUnload":
                self.siblings.role.note(unloaded=request.model_name)
            await self.siblings.ask(method, request, timeout=None)
        return answer

    async def RepositoryModelLoad(self, request, context):
        return await self._everywhere("RepositoryModelLoad", request, self._load_here)

    async def _load_here(self, request: pb.RepositoryModelLoadRequest) -> pb.RepositoryModelLoadResponse:
        if request.parameters:
            raise InvalidInput(f"load parameters ({', '.join(sorted(request.parameters))}) are not supported: "
                               "edit config.pbtxt and the version directories in the repository instead")
        name = request.model_name
        if name not in self.repo.model_names():
            known = ", ".join(self.repo.model_names()) or "none"
            raise ModelNotFound(f"model {shown(name)} is not in the repository (models: {known})")
        await self.repo.load(name)
        self.repo.get(name)  # fails with the reason when no version could be loaded
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        return await self._everywhere("RepositoryModelUnload", request, self._unload_here)

    async def _unload_here(self, request: pb.RepositoryModelUnloadRequest) -> pb.RepositoryModelUnloadResponse:
        await self.repo.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    async def _poll_here(self, request):
        await self.repo.poll_once()
        return request

    def local_handlers(self) -> dict:
        """The local half of each call that spans the workers, served to the siblings (api/siblings.py)."""
        return {"RepositoryModelLoad": self._load_here, "RepositoryModelUnload": self._unload_here,
                "ModelStatistics": self._statistics_here, "RepositoryIndex": self._index_here,
                "TraceSetting": self._trace_here, "LogSettings": self._log_here, POLL: self._poll_here}

    # -- not implemented -------------------------------------------------------------------------------------
    async def SystemSharedMemoryStatus(self, request, context):
        await _unimplemented(context, "system shared memory", _SHARED_MEMORY_HINT)

    async def SystemSharedMemoryRegister(self, request, context):
        await _unimplemented(context, "system shared memory", _SHARED_MEMORY_HINT)

    async def SystemSharedMemoryUnregister(self, request, context):
        await _unimplemented(context, "system shared memory", _SHARED_MEMORY_HINT)

    async def CudaSharedMemoryStatus(self, request, context):
        await _unimplemented(context, "CUDA shared memory", _SHARED_MEMORY_HINT)

    async def CudaSharedMemoryRegister(self, request, context):
        await _unimplemented(context, "CUDA shared memory", _SHARED_MEMORY_HINT)

    async def CudaSharedMemoryUnregister(self, request, context):
        await _unimplemented(context, "CUDA shared memory", _SHARED_MEMORY_HINT)

    # -- trace and log settings (admin) ----------------------------------------------------------------------
    async def TraceSetting(self, request, context):
        return await self._everywhere("TraceSetting", request, self._trace_here)

    async def _trace_here(self, request: pb.TraceSettingRequest) -> pb.TraceSettingResponse:
        return trace_setting(self.tracing, request)

    async def LogSettings(self, request, context):
        return await self._everywhere("LogSettings", request, self._log_here)

    async def _log_here(self, request: pb.LogSettingsRequest) -> pb.LogSettingsResponse:
        return log_settings(self.logs, request)


def register(grpc_server: grpc.aio.Server, service: KServeService) -> None:
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(service, grpc_server)
