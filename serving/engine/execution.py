"""A model version's batch execution: decode every request of a batch into one buffer, run onnxruntime
once, then softmax, ranking and CAM once for the batch, and split the results back per request.

It runs in a batcher worker thread, and knows nothing of queues or gRPC: whatever hands it a list of
`InferenceRequest`s (the dynamic batcher, a batch job's worker) gets one result or error per request.
Feature maps are fetched only when some request of the batch asks for a CAM, so plain classification pays
nothing for the CAM capability.
"""

from __future__ import annotations

import time

import numpy as np

from ..cam_maths import class_activation_maps
from ..repository_format import ModelSpec, class_count
from .decode import decode_batch
from .inference import InferenceRequest, InferenceResult
from .runtime import OrtSessions


class PhasedResults(list):
    """What `execute` returns: one result or error per request, and how long the batch spent in each phase
    (seconds: preparing inputs, running the model, producing outputs; Triton's compute_input, compute_infer
    and compute_output). The batcher hands the phases to its observer as they are."""

    def __init__(self, results, phases: tuple[float, float, float]):
        super().__init__(results)
        self.phases = phases


def probabilities(logits: np.ndarray) -> np.ndarray:
    """Softmax over classes; a binary model's one logit gives sigmoid scores for [negative, positive].
    Non-finite logits (KServe passes any float input through, as Triton does) give NaN, not a warning."""
    with np.errstate(invalid="ignore", over="ignore"):
        if class_count(logits.shape[1]) != logits.shape[1]:
            p = 1 / (1 + np.exp(-logits[:, 0]))
            return np.stack([1 - p, p], axis=1).astype(np.float32)
        z = logits - logits.max(axis=1, keepdims=True)
        e = np.exp(z)
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


class BatchExecution:
    """`execute(batch, instance)` for one loaded model version (its spec, sessions and CAM weights)."""

    def __init__(self, spec: ModelSpec, sessions: OrtSessions, cam_weights: np.ndarray | None):
        self.spec, self.sessions, self.cam_weights = spec, sessions, cam_weights

    def execute(self, batch: list[InferenceRequest], instance: int = 0) -> PhasedResults:
        """One result or error per request, with the time spent preparing inputs, running the model and
        producing outputs (Triton's compute_input, compute_infer and compute_output)."""
        started = time.perf_counter()
        pre = self.spec.preprocessing
        rows, start = [], 0
        for req in batch:
            rows.append(slice(start, start + len(req)))
            start += len(req)
        x = np.empty((start, pre.channels, pre.height, pre.width), np.float32)
        results: list[InferenceResult | Exception | None] = list(decode_batch(batch, rows, x, pre))
        ok = [i for i, r in enumerate(results) if r is None]
        decoded = time.perf_counter()
        if not ok:
            return PhasedResults(results, (decoded - started, 0.0, 0.0))
        want_features = any(batch[i].cam or batch[i].features for i in ok)
        names = [self.spec.logits_output] + ([self.spec.features_output] if want_features else [])
        outs = self.sessions.run(x, names, instance=instance)
        ran = time.perf_counter()
        logits, features = outs[0], (outs[1] if want_features else None)
        # Softmax and ranking once per batch, in the worker, so answering costs a slice per request.
        probs = probabilities(logits)
        ranking = np.argsort(-probs, axis=1, kind="stable")
        ranked = probs[np.arange(len(probs))[:, None], ranking]  # take_along_axis, without its overhead
        cams, cam_classes = self._cams(batch, ok, rows, features, ranking)
        for i in ok:
            req, sl = batch[i], rows[i]
            result = InferenceResult(logits[sl], probs[sl], ranking[sl], ranked[sl],
                                     inputs=x[sl] if req.keep_inputs else None,
                                     features=features[sl] if req.features else None)
            if req.cam:
                result.cams, result.target_classes = cams[sl], cam_classes[sl]
            results[i] = result
        return PhasedResults(results, (decoded - started, ran - decoded, time.perf_counter() - ran))

    def _cams(self, batch: list[InferenceRequest], ok: list[int], rows: list[slice], features: np.ndarray | None,
              ranking: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The maps and their classes for every image whose request asks for them, in one call for the whole
        batch; indexed like the batch's rows, of which only those rows are filled."""
        wanted = [i for i in ok if batch[i].cam]
        if not wanted:
            return None, None
        # The predicted class is the ranking's first, so Explain explains what Classify answers.
        classes = ranking[:, 0].astype(np.int64)
        for i in wanted:
            if batch[i].target_class is not None:
                classes[rows[i]] = batch[i].target_class
        images = np.concatenate([np.arange(rows[i].start, rows[i].stop) for i in wanted])
        # A binary model has one weight row (its one logit) for both classes.
        weight_rows = np.minimum(classes[images], len(self.cam_weights) - 1)
        size = (self.spec.preprocessing.height, self.spec.preprocessing.width)
        cams = np.empty((len(classes), *size), np.float32)
        cams[images] = class_activation_maps(features[images], self.cam_weights, weight_rows, size)
        return cams, classes
