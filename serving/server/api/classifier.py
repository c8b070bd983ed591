"""classifier.v1.Classifier: a thin adapter between wire messages and the model repository."""

from __future__ import annotations

import asyncio

from ...engine import cam
from ...engine.errors import InvalidInput
from ...engine.inference import (
    MAX_IMAGES_PER_REQUEST,
    MODEL_INPUT,
    PIXELS,
    InferenceRequest,
    InferenceResult,
    RawTensor,
    WireImage,
)
from ...repository_format import PLATFORM
from ...wire.classifier.v1 import classifier_pb2 as pb
from ...wire.classifier.v1 import classifier_pb2_grpc as pb_grpc
from ..model import ModelVersion
from ..repository import ModelRepository
from .status import remaining_time, status_of
from .streaming import STREAM_WINDOW, answer_in_order

DEFAULT_TOP_K = 5


def inference_request(images, cam: bool = False, target_class: int | None = None,
                      keep_inputs: bool = False) -> InferenceRequest:
    """The wire images of a Classify or Explain request, as the typed request the batcher queues."""
    if len(images) > MAX_IMAGES_PER_REQUEST:  # before a list of that many is built (the request checks it too)
        raise InvalidInput(f"{len(images)} images in one request; the limit is {MAX_IMAGES_PER_REQUEST}")
    decoded: list[WireImage] = []
    for i, img in enumerate(images):
        kind = img.WhichOneof("content")
        if kind == "encoded":
            decoded.append(img.encoded)
        elif kind == "tensor":
            t = img.tensor
            # classifier.v1's uint8 tensors are pictures (HWC); its float tensors are the model input (CHW).
            decoded.append(RawTensor(tuple(t.shape), t.dtype, t.data, PIXELS if t.dtype == "uint8" else MODEL_INPUT))
        else:
            raise InvalidInput(f"image {i} is empty: set `encoded` (PNG/JPEG bytes) or `tensor`")
    return InferenceRequest(decoded, cam, target_class, keep_inputs)


def classify_response(mv: ModelVersion, result: InferenceResult, k: int) -> pb.ClassifyResponse:
    """Top-k per image from the batch's own ranking (computed once per batch in the worker thread).
    Messages are added in place: building them apart and passing them in would copy each one."""
    response = pb.ClassifyResponse(model=mv.name, version=mv.version)
    add_result, labels = response.results.add, mv.spec.labels
    for row, scores in zip(result.ranking[:, :k].tolist(), result.ranked_probabilities[:, :k].tolist()):
        add_prediction = add_result().predictions.add
        for i, s in zip(row, scores):
            add_prediction(index=i, label=labels[i], score=s)
    return response


class ClassifierService(pb_grpc.ClassifierServicer):
    def __init__(self, repository: ModelRepository):
        self.repo = repository

    async def _classify(self, request: pb.ClassifyRequest, timeout_s: float | None) -> pb.ClassifyResponse:
        if request.top_k < 0:
            raise InvalidInput(f"top_k {request.top_k} is negative")
        inference = inference_request(request.images)
        mv = self.repo.resolve(request.model, request.version)
        result = await mv.infer(inference, timeout_s=timeout_s)
        return classify_response(mv, result, request.top_k or DEFAULT_TOP_K)

    async def Classify(self, request, context):
        return await self._classify(request, remaining_time(context))

    async def ClassifyStream(self, request_iterator, context):
        """Requests run concurrently (up to the window) and are answered in arrival order."""
        classify = lambda m: self._classify(m.request, remaining_time(context))
        async for msg, outcome in answer_in_order(request_iterator, classify, STREAM_WINDOW):
            if isinstance(outcome, Exception):
                code, message = status_of(outcome)
                yield pb.StreamClassifyResponse(request_id=msg.request_id, error_code=code.value[0], error_message=message)
            else:
                yield pb.StreamClassifyResponse(request_id=msg.request_id, response=outcome)

    async def Explain(self, request, context):
        target = request.target_class if request.HasField("target_class") else None
        inference = inference_request(request.images, cam=True, target_class=target, keep_inputs=request.overlay)
        mv = self.repo.resolve(request.model, request.version)
        result = await mv.infer(inference, timeout_s=remaining_time(context))
        overlays = (await asyncio.to_thread(cam.overlays, result.inputs, result.cams) if request.overlay
                    else [b""] * len(inference))
        h, w = result.cams.shape[1:]
        explanations = []
        for i, cls in enumerate(result.target_classes.tolist()):
            explanations.append(pb.Explanation(
                target=pb.Prediction(index=cls, label=mv.spec.labels[cls], score=float(result.probabilities[i, cls])),
                heatmap=pb.Tensor(shape=[h, w], dtype="float32", data=result.cams[i].astype("<f4").tobytes()),
                overlay_png=overlays[i]))
        return pb.ExplainResponse(model=mv.name, version=mv.version, explanations=explanations)

    async def ListModels(self, request, context):
        models = []
        for name in self.repo.model_names():
            models.append(pb.ModelSummary(name=name, versions=self.repo.ready_versions(name), platform=PLATFORM))
        return pb.ListModelsResponse(models=models)

    async def GetModel(self, request, context):
        mv = self.repo.resolve(request.model, request.version)
        pre = mv.spec.preprocessing
        metrics = {k: str(v) for k, v in mv.metadata.metrics.items() if not isinstance(v, (dict, list))}
        parity = mv.metadata.parity_max_abs_diff
        metrics["onnx_parity_max_abs_diff"] = "" if parity is None else str(parity)
        return pb.GetModelResponse(
            name=mv.name, version=mv.version, labels=mv.spec.labels,
            preprocessing=pb.Preprocessing(channels=pre.channels, height=pre.height, width=pre.width,
                                           mean=pre.mean, std=pre.std, color_mode=pre.color_mode),
            versions=[pb.VersionStatus(version=s.version, state=s.state, reason=s.reason)
                      for s in self.repo.statuses(mv.name)],
            metrics=metrics, execution_provider=mv.sessions.provider, supports_cam=mv.supports_cam,
            cam_unsupported_reason=mv.cam_unsupported_reason, max_batch_size=mv.spec.batching.max_batch_size,
            architecture=mv.spec.architecture, parameters=int(mv.metadata.parameters))

