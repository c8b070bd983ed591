"""One loaded model version: the bridge between the batcher (generic), preprocessing and onnxruntime.

Both APIs (classifier.v1 and KServe v2) submit `InferenceRequest`s to the same batcher; a batch is
decoded, run once and split back. Feature maps are fetched only when some request of the batch asks
for a CAM, so plain classification pays nothing for the CAM capability.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from . import cam as cam_ops
from .batcher import DynamicBatcher
from .model_config import CAM_WEIGHTS_FILE, MODEL_FILE, BatchingOptions, ModelSpec, read_metadata
from .preprocess import InvalidInput, to_model_input
from .runtime import OrtModel, RuntimeOptions

log = logging.getLogger("serving.model")


class CamUnavailable(Exception):
    """The model has no linear map from feature maps to logits (maps to FAILED_PRECONDITION)."""


@dataclass
class InferenceRequest:
    """One caller's images: encoded bytes / RawTensor items, or a ready float32 array [n, C, H, W]."""
    images: list | np.ndarray
    cam: bool = False
    cam_class: int | None = None      # None: the predicted class of each image
    keep_inputs: bool = False         # return the model inputs too (for overlays)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, s: slice) -> InferenceRequest:
        return InferenceRequest(self.images[s], self.cam, self.cam_class, self.keep_inputs)


@dataclass
class InferenceResult:
    logits: np.ndarray                     # [n, K]
    probs: np.ndarray | None = None        # [n, K'] softmax (sigmoid pair for one-output models)
    ranking: np.ndarray | None = None      # [n, K'] class indices, most probable first
    ranked_probs: np.ndarray | None = None  # [n, K'] probabilities in ranking order
    cams: np.ndarray | None = None         # [n, H, W] in [0, 1]
    cam_classes: np.ndarray | None = None  # [n]
    inputs: np.ndarray | None = None       # [n, C, H, W]

    @staticmethod
    def concat(parts: list[InferenceResult]) -> InferenceResult:
        def cat(name: str) -> np.ndarray | None:
            values = [getattr(p, name) for p in parts]
            return None if any(v is None for v in values) else np.concatenate(values)
        return InferenceResult(cat("logits"), cat("probs"), cat("ranking"), cat("ranked_probs"),
                               cat("cams"), cat("cam_classes"), cat("inputs"))


def probabilities(logits: np.ndarray) -> np.ndarray:
    """Softmax over classes; a single-output (binary) model gives sigmoid scores for [neg, pos]."""
    if logits.shape[1] == 1:
        p = 1 / (1 + np.exp(-logits[:, 0]))
        return np.stack([1 - p, p], axis=1).astype(np.float32)
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


@dataclass
class ModelVersion:
    spec: ModelSpec
    version: int
    runtime: OrtModel
    batcher: DynamicBatcher
    metadata: dict = field(default_factory=dict)
    cam_weights: np.ndarray | None = None
    cam_reason: str = ""
    loaded_at: float = field(default_factory=time.time)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def supports_cam(self) -> bool:
        return self.cam_weights is not None

    async def infer(self, request: InferenceRequest, priority: int | None = None,
                    timeout_s: float | None = None) -> InferenceResult:
        if request.cam and not self.supports_cam:
            raise CamUnavailable(f"model {self.name} version {self.version} cannot explain: {self.cam_reason}")
        if request.cam_class is not None and not 0 <= request.cam_class < self.spec.num_classes:
            raise InvalidInput(f"target_class {request.cam_class} is outside 0..{self.spec.num_classes - 1}")
        if timeout_s is None and self.spec.batching.default_timeout_us:  # config.pbtxt default_queue_policy
            timeout_s = self.spec.batching.default_timeout_us / 1e6
        return await self.batcher.submit(request, priority=priority, timeout_s=timeout_s)

    def execute(self, batch: list[InferenceRequest], instance: int = 0) -> list[InferenceResult | Exception]:
        """Worker-thread body: decode every request into one batch buffer, run the model once, split back."""
        pre = self.spec.preprocessing
        rows, start = [], 0
        for req in batch:
            rows.append(slice(start, start + len(req)))
            start += len(req)
        x = np.empty((start, pre.channels, pre.height, pre.width), np.float32)
        results: list[InferenceResult | Exception | None] = list(_decode_batch(batch, rows, x, pre))
        ok = [i for i, r in enumerate(results) if r is None]
        if not ok:
            return results  # type: ignore[return-value]
        want_cam = any(batch[i].cam for i in ok)
        names = [self.spec.logits_output] + ([self.spec.features_output] if want_cam else [])
        outs = self.runtime.run(x, names, instance=instance)
        logits, features = outs[0], (outs[1] if want_cam else None)
        # Softmax and ranking once per batch, in the worker, so answering costs a slice per request.
        probs = probabilities(logits)
        ranking = np.argsort(-probs, axis=1, kind="stable")
        ranked = probs[np.arange(len(probs))[:, None], ranking]  # take_along_axis, without its overhead
        for i in ok:
            req, sl = batch[i], rows[i]
            result = InferenceResult(logits[sl], probs=probs[sl], ranking=ranking[sl], ranked_probs=ranked[sl],
                                     inputs=x[sl] if req.keep_inputs else None)
            if req.cam:
                n = sl.stop - sl.start
                classes = (np.full(n, req.cam_class, np.int64) if req.cam_class is not None
                           else logits[sl].argmax(1) if logits.shape[1] > 1 else (logits[sl, 0] > 0).astype(np.int64))
                weight_rows = np.minimum(classes, len(self.cam_weights) - 1)  # binary models: one weight row
                result.cams = cam_ops.class_activation_maps(features[sl], self.cam_weights, weight_rows,
                                                            (self.spec.preprocessing.height, self.spec.preprocessing.width))
                result.cam_classes = classes
            results[i] = result
        return results  # type: ignore[return-value]


def _decode_batch(batch: list[InferenceRequest], rows: list[slice], x: np.ndarray,
                  pre) -> list[InvalidInput | None]:
    """Decode every request into its rows of x; a request with bad input gets its error (its rows are
    zeros) and the others run as sent. The whole batch is first tried in one call, which takes the
    vectorised path when every image is uint8 pixels at the model size (the common wire form)."""
    errors: list[InvalidInput | None] = [None] * len(batch)
    if len(batch) > 1 and not any(isinstance(req.images, np.ndarray) for req in batch):
        try:
            to_model_input([img for req in batch for img in req.images], pre, out=x)
            return errors
        except InvalidInput:
            pass  # some request is at fault: decode one by one to find which
    for i, (req, sl) in enumerate(zip(batch, rows)):
        try:
            if isinstance(req.images, np.ndarray):
                x[sl] = req.images
            else:
                to_model_input(req.images, pre, out=x[sl])
        except InvalidInput as e:
            errors[i] = e
            x[sl] = 0
    return errors


def load_version(spec: ModelSpec, version: int, options: RuntimeOptions | None = None,
                 observer=None) -> ModelVersion:
    """Create sessions, read CAM weights and metadata, and warm up; the caller starts the batcher."""
    vdir = spec.directory / str(version)
    outputs = [spec.logits_output] + ([spec.features_output] if spec.features_output else [])
    b = spec.batching
    runtime = OrtModel(vdir / MODEL_FILE, spec.input_name, outputs, b.instances, options)
    pre = spec.preprocessing
    _check_shapes(runtime, spec)
    metadata = read_metadata(vdir)
    cam_weights, reason = None, metadata.get("cam_unsupported_reason", "")
    if spec.features_output and (vdir / CAM_WEIGHTS_FILE).exists():
        cam_weights = np.load(vdir / CAM_WEIGHTS_FILE).astype(np.float32)
    elif not reason:
        reason = "the repository has no CAM weights for this version"
    runtime.warm_up((pre.channels, pre.height, pre.width), b.max_batch_size)
    inline_units = _inline_units(runtime, (pre.channels, pre.height, pre.width), b)
    mv = ModelVersion(spec, version, runtime, None, metadata, cam_weights, reason)  # type: ignore[arg-type]
    mv.batcher = DynamicBatcher(
        mv.execute, max_batch_size=b.max_batch_size, max_queue_delay_s=b.max_queue_delay_us / 1e6,
        preferred_batch_sizes=b.preferred_batch_sizes, max_queue_size=b.max_queue_size,
        priority_levels=b.priority_levels, default_priority=b.default_priority, instances=b.instances,
        combine=b.combine_requests,
        merge=InferenceResult.concat, observer=observer, inline_max_units=inline_units, name=f"{spec.name}:{version}")
    return mv


def _inline_units(runtime: OrtModel, shape: tuple[int, ...], b: BatchingOptions) -> int:
    """How many images fit in the inline budget: a lone caller's batches that small run on the event loop,
    skipping the hop to a worker thread and back (which costs more than a tiny model's whole run). One
    instance only: several instances need the worker threads to overlap."""
    if b.inline_budget_us <= 0 or b.instances > 1 or runtime.provider != "CPUExecutionProvider":
        return 0
    x = np.zeros((b.max_batch_size, *shape), np.float32)

    def timed(n: int, repeats: int) -> float:  # the median: one slow run must not decide
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            runtime.run(x[:n], [runtime.output_names[0]])
            times.append(time.perf_counter() - started)
        return float(np.median(times))

    budget = b.inline_budget_us / 1e6
    if timed(1, 1) > 10 * budget or timed(1, 7) > budget:  # most models stop here
        return 0
    per_image = max(timed(b.max_batch_size, 3) / b.max_batch_size, 1e-9)
    return int(min(b.max_batch_size, max(1, budget / per_image)))


def _check_shapes(runtime: OrtModel, spec: ModelSpec) -> None:
    """Refuse a model file whose graph disagrees with its config (a wrong file in a version directory)."""
    session = runtime.sessions[0]
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
    classes = outputs[spec.logits_output].shape[-1]
    if isinstance(classes, int) and classes != spec.num_classes and not (classes == 1 and spec.num_classes == 2):
        raise ValueError(f"model gives {classes} logits but labels.txt lists {spec.num_classes} classes")

