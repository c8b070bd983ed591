"""inference.GRPCInferenceService (KServe v2 + Triton's extensions): a thin adapter between Triton's wire
messages and the model repository, so tritonclient, perf_analyzer and KServe tooling work unchanged.

Inputs: one tensor named like the model input, FP32 / FP16 / UINT8 [N, C, H, W] (UINT8 pixels are scaled
by 1/255) or BYTES [N] holding encoded PNG/JPEG images (decoded and resized like classifier.v1), given in
`raw_input_contents` or in typed `contents`. Outputs: `logits`, `probabilities` and `cam` ([N, H, W]),
always in `raw_output_contents`, which is where Triton's clients read numeric data. The `classification`
parameter of a requested output turns it into BYTES top-k strings "score:index:label", as Triton does.
"""

from __future__ import annotations

import math
import struct
from importlib import metadata

import grpc
import numpy as np

from .._proto.inference import grpc_service_pb2 as pb
from .._proto.inference import grpc_service_pb2_grpc as pb_grpc
from ..model import InferenceRequest, InferenceResult, ModelVersion
from ..model_config import PLATFORM, ModelSpec
from ..preprocess import InvalidInput
from ..repository import READY, UNAVAILABLE, ModelNotFound, ModelNotReady, ModelRepository
from .classifier import MAX_IMAGES_PER_REQUEST, resolve_model
from .errors import remaining_time, status_of, status_on_error
from .streaming import answer_in_order

SERVICE_NAME = "inference.GRPCInferenceService"
SERVER_NAME = "cnn-serving"
PROBABILITIES, CAM = "probabilities", "cam"
EXTENSIONS = ["classification", "model_configuration", "model_repository", "schedule_policy", "statistics",
              "parameters"]

# Little-endian numpy types of the accepted numeric input datatypes; FP16 has no typed contents field.
_NUMERIC = {"FP32": np.dtype("<f4"), "FP16": np.dtype("<f2"), "UINT8": np.dtype("u1")}
_TYPED_FIELD = {"FP32": "fp32_contents", "UINT8": "uint_contents", "BYTES": "bytes_contents"}


def _server_version() -> str:
    try:
        return metadata.version(SERVER_NAME)
    except metadata.PackageNotFoundError:  # run from a checkout
        return "0.1.0"


# -- parameters and versions ---------------------------------------------------------------------------------
def parse_version(version: str) -> int:
    """Triton versions are strings; empty means the one the version policy serves (the newest ready)."""
    if not version:
        return 0
    if not version.isdigit():
        raise InvalidInput(f"model version {version!r} is not a non-negative integer")
    return int(version)


def _int_param(params, key: str) -> int | None:
    if key not in params:
        return None
    p = params[key]
    kind = p.WhichOneof("parameter_choice")
    if kind in ("int64_param", "uint64_param"):
        return int(getattr(p, kind))
    if kind == "double_param" and float(p.double_param).is_integer():
        return int(p.double_param)
    if kind == "string_param" and p.string_param.lstrip("-").isdigit():
        return int(p.string_param)
    raise InvalidInput(f"parameter {key!r} must be an integer, got {kind or 'nothing'}")


def _timeout_s(request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> float | None:
    """The tighter of the request's `timeout` (microseconds, Triton's meaning) and the gRPC deadline."""
    limits = [remaining_time(context)]
    timeout_us = _int_param(request.parameters, "timeout")
    if timeout_us is not None:
        if timeout_us < 0:
            raise InvalidInput(f"timeout {timeout_us} us is negative")
        limits.append(timeout_us / 1e6 if timeout_us else None)
    limits = [t for t in limits if t is not None]
    return min(limits) if limits else None


# -- tensors ---------------------------------------------------------------------------------------------------
def deserialize_bytes(raw: bytes) -> list[bytes]:
    """Triton's BYTES wire layout: each element is a 4-byte little-endian length, then the bytes."""
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidInput(f"BYTES tensor is truncated: {len(raw) - offset} stray bytes at offset {offset}")
        (n,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + n > len(raw):
            raise InvalidInput(f"BYTES element {len(items)} claims {n} bytes but only {len(raw) - offset} remain")
        items.append(bytes(raw[offset:offset + n]))
        offset += n
    return items


def serialize_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(x)) + x for x in items)


def _expected_shape(spec: ModelSpec) -> list[int]:
    pre = spec.preprocessing
    return [-1, pre.channels, pre.height, pre.width]


def request_images(request: pb.ModelInferRequest, spec: ModelSpec) -> np.ndarray | list[bytes]:
    """The request's one input as a float32 [N, C, H, W] array, or as encoded images for preprocessing."""
    if len(request.inputs) != 1:
        raise InvalidInput(f"model {spec.name} takes exactly one input ({spec.input_name!r}), "
                           f"the request has {len(request.inputs)}")
    if request.raw_input_contents and len(request.raw_input_contents) != len(request.inputs):
        raise InvalidInput(f"{len(request.raw_input_contents)} raw_input_contents for {len(request.inputs)} inputs; "
                           "send one per input or none")
    tensor = request.inputs[0]
    if tensor.name != spec.input_name:
        raise InvalidInput(f"unexpected input {tensor.name!r} for model {spec.name}; its input is {spec.input_name!r}")
    raw = request.raw_input_contents[0] if request.raw_input_contents else None
    if raw is not None and tensor.contents.ByteSize():
        raise InvalidInput(f"input {tensor.name!r} has both raw_input_contents and contents; send one")
    shape = list(tensor.shape)
    if any(d < 0 for d in shape):
        raise InvalidInput(f"input {tensor.name!r} shape {shape} has a negative dimension")
    count = math.prod(shape)  # exact, where numpy's product could overflow on a hostile shape
    dtype = tensor.datatype
    if dtype == "BYTES":
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1) or not shape[0]:
            raise InvalidInput(f"BYTES input {tensor.name!r} has shape {shape}; send [N] or [N, 1] encoded images")
        items = deserialize_bytes(raw) if raw is not None else list(tensor.contents.bytes_contents)
        if len(items) != count:
            raise InvalidInput(f"BYTES input {tensor.name!r} holds {len(items)} elements, shape {shape} needs {count}")
        if count > MAX_IMAGES_PER_REQUEST:
            raise InvalidInput(f"{count} images in one request; the limit is {MAX_IMAGES_PER_REQUEST}")
        return items
    if dtype not in _NUMERIC:
        raise InvalidInput(f"input {tensor.name!r} datatype {dtype or '(empty)'} is not supported; "
                           "use FP32, FP16, UINT8 ([N, C, H, W]) or BYTES (encoded images)")
    expected = _expected_shape(spec)
    if len(shape) != 4 or shape[1:] != expected[1:] or shape[0] < 1:
        raise InvalidInput(f"input {tensor.name!r} has shape {shape}, but model {spec.name} expects {expected} "
                           f"(N, C, H, W) for {dtype}")
    np_type = _NUMERIC[dtype]
    if raw is not None:
        if len(raw) != count * np_type.itemsize:
            raise InvalidInput(f"input {tensor.name!r} has {len(raw)} raw bytes, but {dtype} shape {shape} "
                               f"needs {count * np_type.itemsize}")
        values = np.frombuffer(raw, np_type)
    else:
        field = _TYPED_FIELD.get(dtype)
        if field is None:
            raise InvalidInput(f"{dtype} input {tensor.name!r} must be sent in raw_input_contents "
                               "(the protocol has no typed contents for it)")
        typed = getattr(tensor.contents, field)
        if len(typed) != count:
            raise InvalidInput(f"input {tensor.name!r} has {len(typed)} values in contents.{field}, "
                               f"shape {shape} needs {count}")
        values = np.asarray(typed, np.int64 if dtype == "UINT8" else np.float32)
        if dtype == "UINT8" and values.max() > 255:  # uint_contents is 32-bit
            raise InvalidInput(f"UINT8 input {tensor.name!r} holds values outside 0..255")
    arr = values.reshape(shape)
    if dtype == "UINT8":
        return arr.astype(np.float32) * np.float32(1 / 255)
    arr = arr.astype(np.float32)  # FP16 -> FP32, and native byte order for onnxruntime
    if not np.isfinite(arr).all():
        raise InvalidInput(f"input {tensor.name!r} holds NaN or infinite values")
    return arr


class _Output:
    """One requested output: its name, top-k for classification (0 = the tensor itself), CAM target."""

    def __init__(self, name: str, classification: int = 0, cam_class: int | None = None):
        self.name, self.classification, self.cam_class = name, classification, cam_class


def requested_outputs(request: pb.ModelInferRequest, spec: ModelSpec, supports_cam: bool) -> list[_Output]:
    names = [spec.logits_output, PROBABILITIES] + ([CAM] if supports_cam else [])
    if not request.outputs:
        return [_Output(spec.logits_output)]  # KServe: no outputs asked for means every output; ours is logits
    outputs, seen = [], set()
    for o in request.outputs:
        if o.name not in names and o.name != CAM:  # CAM on a model without it fails below with the reason
            raise InvalidInput(f"unknown output {o.name!r} for model {spec.name}; outputs: {', '.join(names)}")
        if o.name in seen:
            raise InvalidInput(f"output {o.name!r} is requested twice")
        seen.add(o.name)
        k = _int_param(o.parameters, "classification") or 0
        if k < 0:
            raise InvalidInput(f"classification count {k} for output {o.name!r} is negative")
        if k and o.name == CAM:
            raise InvalidInput("classification applies to logits or probabilities, not to the cam output")
        outputs.append(_Output(o.name, k, _int_param(o.parameters, "cam_class")))
    return outputs


def _classification(values: np.ndarray, k: int, labels: list[str], ranking: np.ndarray | None = None) -> np.ndarray:
    """Triton's classification strings "score:index[:label]", top-k per row by value. The batch's ranking of
    probabilities is also that of the logits (softmax keeps the order), so it is reused where it fits."""
    k = min(k, values.shape[1])
    fits = ranking is not None and ranking.shape == values.shape
    order = ranking[:, :k] if fits else np.argsort(-values, axis=1, kind="stable")[:, :k]
    scores = np.take_along_axis(values, order, axis=1)
    use_labels = len(labels) == values.shape[1]
    return np.array([[f"{scores[r, j]:f}:{i}" + (f":{labels[i]}" if use_labels else "")
                      for j, i in enumerate(row)] for r, row in enumerate(order.tolist())], dtype=object)


def build_response(request: pb.ModelInferRequest, mv: ModelVersion, result: InferenceResult,
                   outputs: list[_Output]) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=mv.name, model_version=str(mv.version), id=request.id)
    for o in outputs:
        if o.name == CAM:
            values = result.cams
        elif o.name == PROBABILITIES:
            values = result.probs  # computed once per batch in the worker thread
        else:
            values = result.logits
        tensor = response.outputs.add(name=o.name)
        if o.classification:
            strings = _classification(values, o.classification, mv.spec.labels, result.ranking)
            tensor.datatype, tensor.shape[:] = "BYTES", list(strings.shape)
            response.raw_output_contents.append(serialize_bytes([s.encode() for s in strings.ravel()]))
            continue
        tensor.datatype, tensor.shape[:] = "FP32", list(values.shape)
        response.raw_output_contents.append(np.ascontiguousarray(values, "<f4").tobytes())
        if o.name == CAM:
            # Which class each map explains (the predicted one unless cam_class was given).
            tensor.parameters["cam_class"].string_param = ",".join(map(str, result.cam_classes.tolist()))
    return response


_SHARED_MEMORY_HINT = "send tensors in the request itself (raw_input_contents or contents)"


async def _unimplemented(context: grpc.aio.ServicerContext, what: str, instead: str) -> None:
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{what} is not supported by this server; {instead}")


class KServeService(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, repository: ModelRepository, inference_server=None, stream_window: int = 64):
        self.repo = repository
        self.inference_server = inference_server
        self.stream_window = stream_window

    # -- health ----------------------------------------------------------------------------------------------
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        # Ready once listening, when some model serves or the repository is empty (nothing to wait for).
        started = self.inference_server is None or self.inference_server.server is not None
        ready = started and (bool(self.repo.all_ready()) or not self.repo.model_names())
        return pb.ServerReadyResponse(ready=ready)

    @status_on_error
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

    @status_on_error
    async def ModelMetadata(self, request, context):
        mv = self.repo.get(request.name, parse_version(request.version))
        spec = mv.spec
        pre = spec.preprocessing
        # A binary model may give one logit for two classes: the logits shape comes from its config.
        logits = next((list(o.dims) for o in spec.config.output if o.name == spec.logits_output and o.dims),
                      [spec.num_classes])
        outputs = [pb.ModelMetadataResponse.TensorMetadata(name=spec.logits_output, datatype="FP32",
                                                           shape=[-1, *logits]),
                   pb.ModelMetadataResponse.TensorMetadata(name=PROBABILITIES, datatype="FP32",
                                                           shape=[-1, spec.num_classes])]
        if mv.supports_cam:
            outputs.append(pb.ModelMetadataResponse.TensorMetadata(name=CAM, datatype="FP32",
                                                                   shape=[-1, pre.height, pre.width]))
        return pb.ModelMetadataResponse(
            name=mv.name, versions=[str(v) for v in self.repo.ready_versions(mv.name)], platform=PLATFORM,
            inputs=[pb.ModelMetadataResponse.TensorMetadata(name=spec.input_name, datatype="FP32",
                                                            shape=_expected_shape(spec))],
            outputs=outputs)

    @status_on_error
    async def ModelConfig(self, request, context):
        mv = self.repo.get(request.name, parse_version(request.version))
        return pb.ModelConfigResponse(config=mv.spec.config)

    # -- inference -------------------------------------------------------------------------------------------
    async def _infer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        if "sequence_id" in request.parameters:
            raise InvalidInput("sequence batching is not supported: these models are stateless")
        mv = resolve_model(self.repo, request.model_name, parse_version(request.model_version))
        images = request_images(request, mv.spec)
        outputs = requested_outputs(request, mv.spec, mv.supports_cam)
        cam = next((o for o in outputs if o.name == CAM), None)
        cam_class = None
        if cam is not None:
            cam_class = cam.cam_class if cam.cam_class is not None else _int_param(request.parameters, "cam_class")
        priority = _int_param(request.parameters, "priority")
        # No await between resolving the version and queueing on its batcher, so a hot swap that retires
        # this version cannot slip in between: the request is queued before the batcher closes and is drained.
        result = await mv.infer(InferenceRequest(images, cam=cam is not None, cam_class=cam_class),
                                priority=priority or None, timeout_s=_timeout_s(request, context))
        return build_response(request, mv, result, outputs)

    @status_on_error
    async def ModelInfer(self, request, context):
        return await self._infer(request, context)

    async def ModelStreamInfer(self, request_iterator, context):
        """Requests run concurrently (up to the window) and are answered in arrival order; a failed request
        is answered with error_message (its id kept) and the stream goes on."""
        async for msg, outcome in answer_in_order(request_iterator, lambda m: self._infer(m, context), self.stream_window):
            if isinstance(outcome, Exception):
                code, message = status_of(outcome)
                yield pb.ModelStreamInferResponse(
                    error_message=f"[{code}] {message}",
                    infer_response=pb.ModelInferResponse(model_name=msg.model_name, model_version=msg.model_version,
                                                         id=msg.id))
            else:
                yield pb.ModelStreamInferResponse(infer_response=outcome)

    # -- statistics ------------------------------------------------------------------------------------------
    @status_on_error
    async def ModelStatistics(self, request, context):
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
    @status_on_error
    async def RepositoryIndex(self, request, context):
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

    @status_on_error
    async def RepositoryModelLoad(self, request, context):
        if request.parameters:
            raise InvalidInput(f"load parameters ({', '.join(sorted(request.parameters))}) are not supported: "
                               "edit config.pbtxt and the version directories in the repository instead")
        name = request.model_name
        if name not in self.repo.model_names():
            known = ", ".join(self.repo.model_names()) or "none"
            raise ModelNotFound(f"model {name!r} is not in the repository (models: {known})")
        await self.repo.load(name)
        self.repo.get(name)  # fails with the reason when no version could be loaded
        return pb.RepositoryModelLoadResponse()

    @status_on_error
    async def RepositoryModelUnload(self, request, context):
        await self.repo.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

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

    async def TraceSetting(self, request, context):
        await _unimplemented(context, "request tracing",
                             "timings are in ModelStatistics and in the Prometheus metrics (--metrics-port)")

    async def LogSettings(self, request, context):
        await _unimplemented(context, "changing log settings", "start the server with --log-level")


def model_statistics(mv: ModelVersion) -> pb.ModelStatistics:
    """Triton's statistics from the batcher's counters: `success` is each successful request's time from
    queueing to its answer; `compute_infer` counts executions (one per batch), as batch_stats do."""
    s = mv.batcher.stats
    failed = s.failures + s.expired + s.rejected
    d = pb.StatisticDuration
    stats = pb.InferStatistics(
        success=d(count=s.succeeded, ns=s.success_ns),
        fail=d(count=failed),
        queue=d(count=s.succeeded + s.failures, ns=s.queue_ns),
        compute_infer=d(count=s.executions, ns=s.compute_ns))
    batches = [pb.InferBatchStatistics(batch_size=size, compute_infer=d(count=n))
               for size, n in sorted(s.batch_sizes.items())]
    return pb.ModelStatistics(name=mv.name, version=str(mv.version), last_inference=s.last_inference_ms,
                              inference_count=s.units, execution_count=s.executions, inference_stats=stats,
                              batch_stats=batches)


def register(grpc_server: grpc.aio.Server, repository: ModelRepository, inference_server=None) -> KServeService:
    service = KServeService(repository, inference_server)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(service, grpc_server)
    return service
