"""One loaded model version: its spec, onnxruntime sessions, batch execution and the batcher in front.

Both APIs (classifier.v1 and KServe v2) submit `InferenceRequest`s to the same batcher through
`ModelVersion.infer`, which is also the boundary where a failure that is not one of `errors` (a bug) is
logged with its traceback and turned into `InternalError`, so the caller learns which model failed and
nothing of the server's insides.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from ..repository_format import (
    CAM_WEIGHTS_FILE,
    MODEL_FILE,
    BatchingOptions,
    ModelSpec,
    VersionMetadata,
    class_count,
    read_metadata,
    version_file,
)
from .batcher import BatchObserver, BatchTracer, DynamicBatcher
from .errors import CamUnsupported, InternalError, InvalidInput, ServingError
from .execution import BatchExecution
from .inference import InferenceRequest, InferenceResult
from .runtime import OrtSessions, RuntimeOptions
from .tracing import set_call_attributes

log = logging.getLogger("serving.model")


@dataclass
class ModelVersion:
    spec: ModelSpec
    version: int
    execution: BatchExecution    # what the batcher runs for each batch (usable without a batcher too)
    batcher: DynamicBatcher
    metadata: VersionMetadata = field(default_factory=VersionMetadata)
    cam_unsupported_reason: str = ""  # why the version cannot explain ("" when it can)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def sessions(self) -> OrtSessions:
        return self.execution.sessions

    @property
    def supports_cam(self) -> bool:
        return not self.cam_unsupported_reason

    async def infer(self, request: InferenceRequest, priority: int | None = None,
                    timeout_s: float | None = None) -> InferenceResult:
        if request.cam and not self.supports_cam:
            raise CamUnsupported(f"model {self.name} version {self.version} cannot explain: "
                                 f"{self.cam_unsupported_reason}")
        if request.target_class is not None and not 0 <= request.target_class < self.spec.num_classes:
            raise InvalidInput(f"target_class {request.target_class} is outside 0..{self.spec.num_classes - 1}")
        set_call_attributes(self.name, self.version, len(request))
        if timeout_s is None and self.spec.batching.default_timeout_us:  # config.pbtxt default_queue_policy
            timeout_s = self.spec.batching.default_timeout_us / 1e6
        try:
            return await self.batcher.submit(request, priority=priority, timeout_s=timeout_s)
        except ServingError:
            raise
        except Exception as e:  # a bug, not the caller's doing: logged whole here, named without internals there
            log.exception("model %s version %d failed on a request of %d image(s)", self.name, self.version,
                          len(request))
            raise InternalError(f"model {self.name} version {self.version} failed on this request; "
                                "the server log has the details") from e


@dataclass
class LoadedVersion:
    """A version's sessions and batch execution, checked against its config and warmed up: what a server
    puts a batcher in front of, and what a batch job's worker calls directly."""
    execution: BatchExecution
    metadata: VersionMetadata
    cam_unsupported_reason: str  # why the version cannot explain ("" when it can)

    @property
    def sessions(self) -> OrtSessions:
        return self.execution.sessions


def load_execution(spec: ModelSpec, version: int, options: RuntimeOptions | None = None,
                   instances: int | None = None, max_batch_size: int | None = None) -> LoadedVersion:
    """Create sessions (one per instance, the config's count unless given), read CAM weights and
    metadata, check the graph against the config, and warm up for batches up to the config's
    max_batch_size (or the given one, for a caller that forms its own batches)."""
    outputs = [spec.logits_output] + ([spec.features_output] if spec.features_output else [])
    b = spec.batching
    # Every file through version_file: a version directory or file linked to outside the model is refused
    # (ConfigError) before anything is read.
    model_path, cam_path = (version_file(spec.directory, version, f) for f in (MODEL_FILE, CAM_WEIGHTS_FILE))
    metadata = read_metadata(spec.directory, version)
    sessions = OrtSessions(model_path, spec.input_name, outputs, instances or b.instances, options)
    pre = spec.preprocessing
    _check_shapes(sessions, spec)
    cam_weights, cam_unsupported_reason = None, metadata.cam_unsupported_reason
    if spec.features_output and cam_path.exists():
        cam_weights = np.load(cam_path).astype(np.float32)
        cam_unsupported_reason = ""
    elif not cam_unsupported_reason:
        cam_unsupported_reason = "the repository has no CAM weights for this version"
    sessions.warm_up((pre.channels, pre.height, pre.width), max_batch_size or b.max_batch_size)
    return LoadedVersion(BatchExecution(spec, sessions, cam_weights), metadata, cam_unsupported_reason)


def load_version(spec: ModelSpec, version: int, options: RuntimeOptions | None = None,
                 observer: BatchObserver | None = None, tracer: BatchTracer | None = None) -> ModelVersion:
    """The loaded version with a batcher (not yet started) in front."""
    loaded = load_execution(spec, version, options)
    execution, b, pre = loaded.execution, spec.batching, spec.preprocessing
    batcher = DynamicBatcher(
        execution.execute, max_batch_size=b.max_batch_size, max_queue_delay_s=b.max_queue_delay_us / 1e6,
        preferred_batch_sizes=b.preferred_batch_sizes, max_queue_size=b.max_queue_size,
        priority_levels=b.priority_levels, default_priority=b.default_priority, instances=b.instances,
        combine=b.combine_requests, merge=InferenceResult.concat, observer=observer, tracer=tracer,
        inline_max_units=_inline_units(loaded.sessions, (pre.channels, pre.height, pre.width), b),
        name=f"{spec.name}:{version}")
    return ModelVersion(spec, version, execution, batcher, loaded.metadata, loaded.cam_unsupported_reason)


def _inline_units(sessions: OrtSessions, shape: tuple[int, ...], b: BatchingOptions) -> int:
    """How many images fit in the inline budget: a lone caller's batches that small run on the event loop,
    skipping the hop to a worker thread and back (which costs more than a tiny model's whole run). One
    instance only: several instances need the worker threads to overlap."""
    if b.inline_budget_us <= 0 or b.instances > 1 or sessions.provider != "CPUExecutionProvider":
        return 0
    x = np.zeros((b.max_batch_size, *shape), np.float32)

    def timed(n: int, repeats: int) -> float:  # the median: one slow run must not decide
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            sessions.run(x[:n], [sessions.output_names[0]])
            times.append(time.perf_counter() - started)
        return float(np.median(times))

    budget = b.inline_budget_us / 1e6
    if timed(1, 1) > 10 * budget or timed(1, 7) > budget:  # most models stop here
        return 0
    per_image = max(timed(b.max_batch_size, 3) / b.max_batch_size, 1e-9)
    return int(min(b.max_batch_size, max(1, budget / per_image)))


def _check_shapes(sessions: OrtSessions, spec: ModelSpec) -> None:
    """Refuse a model file whose graph disagrees with its config (a wrong file in a version directory)."""
    session = sessions.sessions[0]
    inputs = {i.name: i for i in session.get_inputs()}
    if spec.input_name not in inputs:
        raise ValueError(f"model has no input {spec.input_name!r} (it has {', '.join(inputs)})")
    shape = inputs[spec.input_name].shape
    want = [spec.preprocessing.channels, spec.preprocessing.height, spec.preprocessing.width]
    if len(shape) != 4 or [d if isinstance(d, int) else None for d in shape[1:]] != want:
        raise ValueError(f"model input shape {shape} does not match the config's [-1, {want}]")
    outputs = {o.name: o for o in session.get_outputs()}
    for name in [spec.logits_output] + ([spec.features_output] if spec.features_output else []):
        if name not in outputs:
            raise ValueError(f"model has no output {name!r} (it has {', '.join(outputs)})")
    logits = outputs[spec.logits_output].shape[-1]
    if isinstance(logits, int) and class_count(logits) != spec.num_classes:
        raise ValueError(f"model gives {logits} logits but labels.txt lists {spec.num_classes} classes")
