"""One served model version: what the engine loaded (`engine.loading`), the batcher in front and its statistics.

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

from ..engine.errors import CamUnsupported, InternalError, InvalidInput, ServingError
from ..engine.execution import BatchExecution
from ..engine.inference import InferenceRequest, InferenceResult
from ..engine.loading import load_execution
from ..engine.runtime import OrtSessions, RuntimeOptions
from ..repository_format import BatchingOptions, ModelSpec, VersionMetadata
from .batcher import BatchTracer, DynamicBatcher
from .statistics import SeriesSink, VersionStatistics
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
    stats: VersionStatistics = field(default_factory=VersionStatistics)  # what its batcher reported

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


def load_version(spec: ModelSpec, version: int, options: RuntimeOptions | None = None,
                 series: SeriesSink | None = None, tracer: BatchTracer | None = None) -> ModelVersion:
    """The loaded version with a batcher (not yet started) in front; its statistics feed `series` too."""
    loaded = load_execution(spec, version, options)
    execution, b, pre = loaded.execution, spec.batching, spec.preprocessing
    stats = VersionStatistics(series=series)
    batcher = DynamicBatcher(
        execution.execute, max_batch_size=b.max_batch_size, max_queue_delay_s=b.max_queue_delay_us / 1e6,
        preferred_batch_sizes=b.preferred_batch_sizes, max_queue_size=b.max_queue_size,
        priority_levels=b.priority_levels, default_priority=b.default_priority, instances=b.instances,
        combine=b.combine_requests, merge=InferenceResult.concat, observer=stats, tracer=tracer,
        inline_max_units=_inline_units(loaded.sessions, (pre.channels, pre.height, pre.width), b),
        name=f"{spec.name}:{version}")
    return ModelVersion(spec, version, execution, batcher, loaded.metadata, loaded.cam_unsupported_reason, stats)


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
