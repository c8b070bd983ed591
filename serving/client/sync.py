"""The blocking client for classifier.v1."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterable, Iterator, Sequence

import grpc

from ..wire.classifier.v1 import classifier_pb2 as pb
from ..wire.classifier.v1 import classifier_pb2_grpc as pb_grpc
from . import messages
from .connection import Tls, call_metadata, channel
from .messages import (
    DEFAULT_MAX_MESSAGE_BYTES,
    RETRYABLE,
    Explanation,
    ImageLike,
    ModelInfo,
    Prediction,
    StreamResult,
)
from .retry import RetryPolicy
from .tracecontext import with_trace_context


class ClassifierClient:
    """Blocking client. `targets` is "host:port" or a list of them (round robin per call). `tls` connects with
    TLS (with a client certificate for mutual TLS); `token` is sent as `authorization: Bearer <token>` on every
    call (None: $CNN_SERVING_TOKEN, "" none)."""

    def __init__(self, targets: str | Sequence[str], timeout_s: float = 30.0, retries: int = 3,
                 backoff_s: float = 0.1, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 tls: Tls | None = None, token: str | None = None):
        self.targets = [targets] if isinstance(targets, str) else list(targets)
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.policy = RetryPolicy(retries, initial_backoff_s=backoff_s)
        self._channels = [channel(t, messages.channel_options(max_message_bytes, self.policy), tls) for t in self.targets]
        self._metadata = call_metadata(token)
        self._stubs = [pb_grpc.ClassifierStub(c) for c in self._channels]
        self._next = itertools.cycle(range(len(self._stubs)))

    def _call(self, method: str, request, timeout_s: float | None = None):
        # gRPC has already retried UNAVAILABLE on this target's channel, with backoff (retry.py); with several
        # targets, such a call then goes to each of the others once, in turn.
        first, tries = next(self._next), len(self._stubs) if self.policy.retries > 0 else 1
        for n in range(tries):
            stub = self._stubs[(first + n) % len(self._stubs)]
            try:
                return getattr(stub, method)(request, timeout=timeout_s or self.timeout_s,
                                             metadata=with_trace_context(self._metadata))
            except grpc.RpcError as e:
                if e.code() not in RETRYABLE or n == tries - 1:
                    raise messages.client_error(e) from None  # typed: NotFound, InvalidArgument, ...

    def classify(self, images: Iterable[ImageLike], model: str = "", top_k: int = 5,
                 version: int = 0) -> list[list[Prediction]]:
        req = messages.classify_request(images, model, version, top_k)
        return [messages.predictions(c) for c in self._call("Classify", req).results]

    def explain(self, images: Iterable[ImageLike], model: str = "", target_class: int | None = None,
                overlay: bool = False, version: int = 0) -> list[Explanation]:
        req = messages.explain_request(images, model, version, target_class, overlay)
        return messages.explanations(self._call("Explain", req))

    def list_models(self) -> dict[str, list[int]]:
        return {m.name: list(m.versions) for m in self._call("ListModels", pb.ListModelsRequest()).models}

    def get_model(self, model: str = "", version: int = 0) -> ModelInfo:
        return messages.model_info(self._call("GetModel", pb.GetModelRequest(model=model, version=version)))

    def classify_stream(self, batches: Iterable[tuple[str, Sequence[ImageLike]]], model: str = "", top_k: int = 5,
                        window: int = 16, target_index: int | None = None,
                        version: int = 0) -> Iterator[StreamResult]:
        """Stream (request_id, images) batches; at most `window` requests are in flight at once.
        Yields a StreamResult per request, in order (request_id echoed; error_code and error_message set on a
        failed item, and the stream goes on). A failure of the whole stream raises a typed ClientError.
        `version` pins every request to one version (0: the newest ready, request by request)."""
        responses = self.classify_stream_messages(batches, model, top_k, window, target_index, version)
        try:
            for response in responses:
                yield messages.stream_result(response)
        except grpc.RpcError as e:
            raise messages.client_error(e) from None
        finally:
            responses.close()  # a caller that stops early cancels the call at once, not when collected

    def classify_stream_messages(self, batches: Iterable[tuple[str, Sequence[ImageLike]]], model: str = "",
                                 top_k: int = 5, window: int = 16, target_index: int | None = None,
                                 version: int = 0) -> Iterator[pb.StreamClassifyResponse]:
        """classify_stream without the conversion: the server's own messages, for callers that pass them on."""
        slots = threading.Semaphore(window)
        stop = threading.Event()

        def requests():
            for request_id, images in batches:
                while not slots.acquire(timeout=0.1):
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                yield messages.stream_request(request_id, images, model, top_k, version)

        stub = self._stubs[next(self._next) if target_index is None else target_index]
        call = stub.ClassifyStream(requests(), metadata=with_trace_context(self._metadata))
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
