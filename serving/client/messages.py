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
# The image files a folder given to `classify`, `explain` or a batch job is searched for.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm",
                            ".pbm"})


def images_under(folder: Path) -> list[Path]:
    """The image files under a folder, at any depth, sorted (what `classify`, `explain` and `batch` send)."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


class ClientError(grpc.aio.AioRpcError):
    """A call the server refused or could not answer, typed by its status code (`NotFound`, `InvalidArgument`,
    `Unavailable`, ...). It is a grpc.RpcError (and an AioRpcError, whichever client raised it), so code written
    against raw gRPC errors keeps working: `code()` and `details()` answer as before."""

    def __init__(self, code: grpc.StatusCode, details: str = "", debug_error_string: str | None = None):
        super().__init__(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details, debug_error_string)

    def __str__(self) -> str:
        return f"{self.code().name}: {self.details()}"


class InvalidArgument(ClientError):
    """The request is malformed: an undecodable image, a bad shape, a class index out of range."""


class NotFound(ClientError):
    """No such model or version."""


class FailedPrecondition(ClientError):
    """The model cannot do this (CAM on a head that is not linear in its feature maps)."""


class ResourceExhausted(ClientError):
    """The server's queue is full, or a message is above its size limit."""


class DeadlineExceeded(ClientError):
    """The call's deadline passed."""


class Unavailable(ClientError):
    """The server is unreachable, draining, or has no ready version (retry later)."""


class Unauthenticated(ClientError):
    """No token, or one the server does not know."""


class PermissionDenied(ClientError):
    """The token may not do this (an inference token on a management call)."""


class Cancelled(ClientError):
    """The call was cancelled."""


class Internal(ClientError):
    """A fault of the server (its log has the traceback)."""


class Unimplemented(ClientError):
    """The server does not implement this call."""


_ERROR_TYPES = {cls.__name__: cls for cls in (InvalidArgument, NotFound, FailedPrecondition, ResourceExhausted,
                                              DeadlineExceeded, Unavailable, Unauthenticated, PermissionDenied,
                                              Cancelled, Internal, Unimplemented)}
ERROR_TYPES: dict[grpc.StatusCode, type[ClientError]] = {
    code: _ERROR_TYPES.get("".join(w.capitalize() for w in code.name.split("_")), ClientError)
    for code in grpc.StatusCode if code is not grpc.StatusCode.OK}


def client_error(e: grpc.RpcError) -> ClientError:
    """The typed error for a raw gRPC error (the same object when it is typed already)."""
    if isinstance(e, ClientError):
        return e
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = e.details() if hasattr(e, "details") else str(e)
    debug = e.debug_error_string() if hasattr(e, "debug_error_string") else None
    return typed_error(code, details or "", debug)


def typed_error(code: grpc.StatusCode, details: str, debug_error_string: str | None = None) -> ClientError:
    """The ClientError subclass of a status code (ClientError itself for a code without one)."""
    return ERROR_TYPES.get(code, ClientError)(code, details, debug_error_string)


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
class StreamResult:
    """One answer of `classify_stream`: the request's id, and its predictions (one list per image) or the
    status code and message of its failure (the stream goes on after a failed item)."""
    request_id: str
    predictions: list[list[Prediction]] = field(default_factory=list)
    model: str = ""
    version: int = 0
    error_code: int = 0          # a grpc.StatusCode value; 0 when the request succeeded
    error_message: str = ""

    @property
    def ok(self) -> bool:
        return not self.error_code

    @property
    def error(self) -> ClientError | None:
        """The failure as the typed error a unary call would raise, or None."""
        if not self.error_code:
            return None
        return typed_error(_STATUS_BY_VALUE.get(self.error_code, grpc.StatusCode.UNKNOWN), self.error_message)


_STATUS_BY_VALUE = {c.value[0]: c for c in grpc.StatusCode}


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
    metrics: dict[str, float | str] = field(default_factory=dict)  # numbers as floats, notes as text
    versions: list[tuple[int, str, str]] = field(default_factory=list)


def _typed_metric(text: str) -> float | str:
    """The wire carries metrics as strings; a number comes back as a float (test_acc 0.9274, not "0.9274")."""
    try:
        return float(text)
    except ValueError:
        return text


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
        from PIL import ImageOps  # only reached with a PIL image in hand, so Pillow is there
        buf = io.BytesIO()
        # A photo's EXIF orientation is applied before the pixels are re-encoded (PNG drops the tag): a phone
        # picture is classified upright, not on its side.
        ImageOps.exif_transpose(image).save(buf, format="PNG")
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
                     r.architecture, r.parameters, {k: _typed_metric(v) for k, v in r.metrics.items()},
                     [(v.version, v.state, v.reason) for v in r.versions])


def classify_request(images, model: str, version: int, top_k: int) -> pb.ClassifyRequest:
    return pb.ClassifyRequest(model=model, version=version, top_k=top_k, images=[to_wire_image(i) for i in images])


def stream_request(request_id: str, images, model: str, top_k: int, version: int = 0) -> pb.StreamClassifyRequest:
    return pb.StreamClassifyRequest(request_id=request_id, request=classify_request(images, model, version, top_k))


def stream_result(r: pb.StreamClassifyResponse) -> StreamResult:
    if r.error_code:
        return StreamResult(r.request_id, error_code=r.error_code, error_message=r.error_message)
    return StreamResult(r.request_id, [predictions(c) for c in r.response.results], r.response.model,
                        r.response.version)


def explain_request(images, model, version, target_class, overlay) -> pb.ExplainRequest:
    req = pb.ExplainRequest(model=model, version=version, images=[to_wire_image(i) for i in images], overlay=overlay)
    if target_class is not None:
        req.target_class = target_class
    return req


def channel_options(max_message_bytes: int, policy: RetryPolicy) -> list[tuple[str, int | str]]:
    """The options of a client channel: message size limits both ways, and the retry policy's (retry.py)."""
    return [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes), *retry.channel_options(policy)]
