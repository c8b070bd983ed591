"""Python client for classifier.v1: sync and asyncio, numpy in / numpy out, typed results.

    from serving.client import ClassifierClient
    with ClassifierClient("127.0.0.1:8001") as client:
        preds = client.classify(["shoe.png"], model="fashion_mnist", top_k=3)
        print(preds[0][0].label, preds[0][0].score)
        cams = client.explain(["shoe.png"], model="fashion_mnist", overlay=True)

Channels are reused across calls; several targets are used round robin (one job, many replicas); calls
that fail with UNAVAILABLE are retried with exponential backoff; every call has a deadline.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import os
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from ._proto.classifier.v1 import classifier_pb2 as pb
from ._proto.classifier.v1 import classifier_pb2_grpc as pb_grpc

ImageLike = bytes | str | os.PathLike | np.ndarray
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)


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


def _predictions(c: pb.Classification) -> list[Prediction]:
    return [Prediction(p.index, p.label, p.score) for p in c.predictions]


def _explanations(resp: pb.ExplainResponse) -> list[Explanation]:
    out = []
    for e in resp.explanations:
        heat = np.frombuffer(e.heatmap.data, "<f4").reshape(tuple(e.heatmap.shape))
        out.append(Explanation(Prediction(e.target.index, e.target.label, e.target.score), heat, e.overlay_png))
    return out


def _model_info(r: pb.GetModelResponse) -> ModelInfo:
    p = r.preprocessing
    return ModelInfo(r.name, r.version, list(r.labels), (p.channels, p.height, p.width), list(p.mean), list(p.std),
                     r.execution_provider, r.supports_cam, r.cam_unsupported_reason, r.max_batch_size,
                     r.architecture, r.parameters, dict(r.metrics), [(v.version, v.state, v.reason) for v in r.versions])


def _explain_request(images, model, version, target_class, overlay) -> pb.ExplainRequest:
    req = pb.ExplainRequest(model=model, version=version, images=[to_wire_image(i) for i in images], overlay=overlay)
    if target_class is not None:
        req.target_class = target_class
    return req


def _channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes)]


class ClassifierClient:
    """Blocking client. `targets` is "host:port" or a list of them (round robin per call)."""

    def __init__(self, targets: str | Sequence[str], timeout_s: float = 30.0, retries: int = 3,
                 backoff_s: float = 0.1, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        self.targets = [targets] if isinstance(targets, str) else list(targets)
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self._channels = [grpc.insecure_channel(t, options=_channel_options(max_message_bytes)) for t in self.targets]
        self._stubs = [pb_grpc.ClassifierStub(c) for c in self._channels]
        self._next = itertools.cycle(range(len(self._stubs)))

    def _call(self, method: str, request, timeout_s: float | None = None):
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            stub = self._stubs[next(self._next)]
            try:
                return getattr(stub, method)(request, timeout=timeout_s or self.timeout_s)
            except grpc.RpcError as e:
                if e.code() not in RETRYABLE or attempt == self.retries:
                    raise
                time.sleep(delay)
                delay *= 2

    def classify(self, images: Iterable[ImageLike], model: str = "", top_k: int = 5,
                 version: int = 0) -> list[list[Prediction]]:
        req = pb.ClassifyRequest(model=model, version=version, top_k=top_k, images=[to_wire_image(i) for i in images])
        return [_predictions(c) for c in self._call("Classify", req).results]

    def explain(self, images: Iterable[ImageLike], model: str = "", target_class: int | None = None,
                overlay: bool = False, version: int = 0) -> list[Explanation]:
        return _explanations(self._call("Explain", _explain_request(images, model, version, target_class, overlay)))

    def list_models(self) -> dict[str, list[int]]:
        return {m.name: list(m.versions) for m in self._call("ListModels", pb.ListModelsRequest()).models}

    def get_model(self, model: str = "", version: int = 0) -> ModelInfo:
        return _model_info(self._call("GetModel", pb.GetModelRequest(model=model, version=version)))

    def classify_stream(self, batches: Iterable[tuple[str, Sequence[ImageLike]]], model: str = "", top_k: int = 5,
                        window: int = 16, target_index: int | None = None) -> Iterator[pb.StreamClassifyResponse]:
        """Stream (request_id, images) batches; at most `window` requests are in flight at once.
        Yields the server's responses in order (request_id echoed, error_code set on a failed item)."""
        import threading

        slots = threading.Semaphore(window)
        stop = threading.Event()

        def requests():
            for request_id, images in batches:
                while not slots.acquire(timeout=0.1):
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                yield pb.StreamClassifyRequest(
                    request_id=request_id,
                    request=pb.ClassifyRequest(model=model, top_k=top_k, images=[to_wire_image(i) for i in images]))

        stub = self._stubs[next(self._next) if target_index is None else target_index]
        call = stub.ClassifyStream(requests())
        try:
            for response in call:
                slots.release()
                yield response
        finally:
            stop.set()
            call.cancel()

    def close(self) -> None:
        for c in self._channels:
            c.close()

    def __enter__(self) -> ClassifierClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClassifierClient:
    """asyncio client with the same calls as ClassifierClient (awaitable)."""

    def __init__(self, targets: str | Sequence[str], timeout_s: float = 30.0, retries: int = 3,
                 backoff_s: float = 0.1, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        self.targets = [targets] if isinstance(targets, str) else list(targets)
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self._channels = [grpc.aio.insecure_channel(t, options=_channel_options(max_message_bytes))
                          for t in self.targets]
        self._stubs = [pb_grpc.ClassifierStub(c) for c in self._channels]
        self._next = itertools.cycle(range(len(self._stubs)))

    async def _call(self, method: str, request, timeout_s: float | None = None):
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            stub = self._stubs[next(self._next)]
            try:
                return await getattr(stub, method)(request, timeout=timeout_s or self.timeout_s)
            except grpc.aio.AioRpcError as e:
                if e.code() not in RETRYABLE or attempt == self.retries:
                    raise
                await asyncio.sleep(delay)
                delay *= 2

    async def classify(self, images: Iterable[ImageLike], model: str = "", top_k: int = 5,
                       version: int = 0) -> list[list[Prediction]]:
        req = pb.ClassifyRequest(model=model, version=version, top_k=top_k, images=[to_wire_image(i) for i in images])
        return [_predictions(c) for c in (await self._call("Classify", req)).results]

    async def explain(self, images: Iterable[ImageLike], model: str = "", target_class: int | None = None,
                      overlay: bool = False, version: int = 0) -> list[Explanation]:
        req = _explain_request(images, model, version, target_class, overlay)
        return _explanations(await self._call("Explain", req))

    async def list_models(self) -> dict[str, list[int]]:
        resp = await self._call("ListModels", pb.ListModelsRequest())
        return {m.name: list(m.versions) for m in resp.models}

    async def get_model(self, model: str = "", version: int = 0) -> ModelInfo:
        return _model_info(await self._call("GetModel", pb.GetModelRequest(model=model, version=version)))

    async def classify_stream(self, batches: AsyncIterator[tuple[str, Sequence[ImageLike]]] | Iterable,
                              model: str = "", top_k: int = 5, window: int = 16,
                              target_index: int | None = None) -> AsyncIterator:
        """As ClassifierClient.classify_stream; `target_index` pins the stream to one target (one stream per
        replica), otherwise targets are taken round robin. Closing the iterator cancels the call."""
        slots = asyncio.Semaphore(window)

        async def requests():
            async for request_id, images in _aiter(batches):
                await slots.acquire()
                yield pb.StreamClassifyRequest(
                    request_id=request_id,
                    request=pb.ClassifyRequest(model=model, top_k=top_k, images=[to_wire_image(i) for i in images]))

        call = self._stubs[next(self._next) if target_index is None else target_index].ClassifyStream(requests())
        try:
            async for response in call:
                slots.release()
                yield response
        finally:
            call.cancel()  # an abandoned iterator must not leave the stream (and its request feed) open

    async def close(self) -> None:
        for c in self._channels:
            await c.close()

    async def __aenter__(self) -> AsyncClassifierClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


async def _aiter(items):
    if hasattr(items, "__aiter__"):
        async for x in items:
            yield x
    else:
        for x in items:
            yield x
