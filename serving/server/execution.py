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

from ..repository_format import ModelSpec, Preprocessing, class_count
from . import cam as cam_ops
from .batcher import PhasedResults
from .errors import InvalidInput
from .inference import InferenceRequest, InferenceResult
from .preprocess import to_model_input
from .runtime import OrtSessions


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
        results: list[InferenceResult | Exception | None] = list(_decode_batch(batch, rows, x, pre))
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
        for i in ok:
            req, sl = batch[i], rows[i]
            result = InferenceResult(logits[sl], probs[sl], ranking[sl], ranked[sl],
                                     inputs=x[sl] if req.keep_inputs else None,
                                     features=features[sl] if req.features else None)
            if req.cam:
                # The predicted class is the ranking's first, so Explain explains what Classify answers.
                classes = (np.full(sl.stop - sl.start, req.target_class, np.int64) if req.target_class is not None
                           else ranking[sl, 0].astype(np.int64))
                result.cams = self._cams(features[sl], classes)
                result.target_classes = classes
            results[i] = result
        return PhasedResults(results, (decoded - started, ran - decoded, time.perf_counter() - ran))

    def _cams(self, features: np.ndarray, classes: np.ndarray) -> np.ndarray:
        # A binary model has one weight row (its one logit) for both classes.
        weight_rows = np.minimum(classes, len(self.cam_weights) - 1)
        size = (self.spec.preprocessing.height, self.spec.preprocessing.width)
        return cam_ops.class_activation_maps(features, self.cam_weights, weight_rows, size)


def _decode_batch(batch: list[InferenceRequest], rows: list[slice], x: np.ndarray,
                  pre: Preprocessing) -> list[InvalidInput | None]:
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
