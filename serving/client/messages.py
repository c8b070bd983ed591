"""What the sync and asyncio clients share: result types, images to wire messages, responses to results."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from ..wire.classifier.v1 import classifier_pb2 as pb
from . import retry
from .retry import RetryPolicy

ImageLike = bytes | str | os.PathLike | np.ndarray
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Calls a client repeats by itself: the server is restarting or has no ready version yet, not the request
# being bad. gRPC retries them on their channel (retry.py); a client of several targets then tries the next.
# (Batch jobs also resend when a replica is busy: `jobs.grpc_engine` extends this set.)
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})


@dataclass(frozen=True)
class Prediction:
    index: int
    label: str
    score: float


@dataclass
class Explanation:
    target: Prediction
    heatmap: np.ndarray      # float32 [H, W] in [0, 1]
    overlay_png: bytes = b""


@dataclass
class ModelInfo:
    name: str
    version: int
    labels: list[str]
    input_shape: tuple[int, int, int]
    mean: list[float]
    std: list[float]
    execution_provider: str
    supports_cam: bool
    cam_unsupported_reason: str
    max_batch_size: int
    architecture: str
    parameters: int
    metrics: dict[str, str] = field(default_factory=dict)
    versions: list[tuple[int, str, str]] = field(default_factory=list)


def to_wire_image(image: ImageLike) -> pb.Image:
    """bytes = encoded PNG/JPEG; path = file to read; uint8 array = pixels [H, W(, C)];
    float32 array = the model input [C, H, W] in [0, 1]."""
    if isinstance(image, bytes):
        return pb.Image(encoded=image)
    if isinstance(image, (str, os.PathLike)):
        return pb.Image(encoded=Path(image).read_bytes())
    if isinstance(image, np.ndarray):
        if image.dtype == np.uint8:
            dtype = "uint8"
        elif image.dtype in (np.float32, np.float64):
            image, dtype = image.astype(np.float32), "float32"
        else:
            raise TypeError(f"array dtype {image.dtype} is not uint8 or float32")
        return pb.Image(tensor=pb.Tensor(shape=list(image.shape), dtype=dtype,
                                         data=np.ascontiguousarray(image).astype(image.dtype.newbyteorder("<")).tobytes()))
    if hasattr(image, "save"):  # a PIL image
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return pb.Image(encoded=buf.getvalue())
    raise TypeError(f"cannot send {type(image).__name__} as an image")


def predictions(c: pb.Classification) -> list[Prediction]:
    return [Prediction(p.index, p.label, p.score) for p in c.predictions]


def explanations(resp: pb.ExplainResponse) -> list[Explanation]:
    out = []
    for e in resp.explanations:
        heat = np.frombuffer(e.heatmap.data, "<f4").reshape(tuple(e.heatmap.shape))
        out.append(Explanation(Prediction(e.target.index, e.target.label, e.target.score), heat, e.overlay_png))
    return out


def model_info(r: pb.GetModelResponse) -> ModelInfo:
    p = r.preprocessing
    return ModelInfo(r.name, r.version, list(r.labels), (p.channels, p.height, p.width), list(p.mean), list(p.std),
                     r.execution_provider, r.supports_cam, r.cam_unsupported_reason, r.max_batch_size,
                     r.architecture, r.parameters, dict(r.metrics), [(v.version, v.state, v.reason) for v in r.versions])


def classify_request(images, model: str, version: int, top_k: int) -> pb.ClassifyRequest:
    return pb.ClassifyRequest(model=model, version=version, top_k=top_k, images=[to_wire_image(i) for i in images])


def stream_request(request_id: str, images, model: str, top_k: int) -> pb.StreamClassifyRequest:
    return pb.StreamClassifyRequest(request_id=request_id, request=classify_request(images, model, 0, top_k))


def explain_request(images, model, version, target_class, overlay) -> pb.ExplainRequest:
    req = pb.ExplainRequest(model=model, version=version, images=[to_wire_image(i) for i in images], overlay=overlay)
    if target_class is not None:
        req.target_class = target_class
    return req


def channel_options(max_message_bytes: int, policy: RetryPolicy) -> list[tuple[str, int | str]]:
    """The options of a client channel: message size limits both ways, and the retry policy's (retry.py)."""
    return [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes), *retry.channel_options(policy)]
