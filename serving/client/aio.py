"""The asyncio client for classifier.v1: the calls of the blocking one, awaitable."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterable, Sequence

import grpc

from ..wire.classifier.v1 import classifier_pb2 as pb
from ..wire.classifier.v1 import classifier_pb2_grpc as pb_grpc
from . import messages
from .connection import Tls, aio_channel, call_metadata
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


class AsyncClassifierClient:
    """asyncio client with the same calls as ClassifierClient (awaitable), and the same `tls` and `token`."""

    def __init__(self, targets: str | Sequence[str], timeout_s: float = 30.0, retries: int = 3,
                 backoff_s: float = 0.1, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 tls: Tls | None = None, token: str | None = None):
        self.targets = [targets] if isinstance(targets, str) else list(targets)
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.policy = RetryPolicy(retries, initial_backoff_s=backoff_s)
        self._channels = [aio_channel(t, messages.channel_options(max_message_bytes, self.policy), tls) for t in self.targets]
        self._metadata = call_metadata(token)
        self._stubs = [pb_grpc.ClassifierStub(c) for c in self._channels]
        self._next = itertools.cycle(range(len(self._stubs)))

    async def _call(self, method: str, request, timeout_s: float | None = None):
        # gRPC has already retried UNAVAILABLE on this target's channel, with backoff (retry.py); with several
        # targets, such a call then goes to each of the others once, in turn.
        first, tries = next(self._next), len(self._stubs) if self.policy.retries > 0 else 1
        for n in range(tries):
            stub = self._stubs[(first + n) % len(self._stubs)]
            try:
                return await getattr(stub, method)(request, timeout=timeout_s or self.timeout_s,
                                             metadata=with_trace_context(self._metadata))
            except grpc.aio.AioRpcError as e:
                if e.code() not in RETRYABLE or n == tries - 1:
                    raise messages.client_error(e) from None  # typed: NotFound, InvalidArgument, ...

    async def classify(self, images: Iterable[ImageLike], model: str = "", top_k: int = 5,
                       version: int = 0) -> list[list[Prediction]]:
        req = messages.classify_request(images, model, version, top_k)
        return [messages.predictions(c) for c in (await self._call("Classify", req)).results]

    async def explain(self, images: Iterable[ImageLike], model: str = "", target_class: int | None = None,
                      overlay: bool = False, version: int = 0) -> list[Explanation]:
        req = messages.explain_request(images, model, version, target_class, overlay)
        return messages.explanations(await self._call("Explain", req))

    async def list_models(self) -> dict[str, list[int]]:
        resp = await self._call("ListModels", pb.ListModelsRequest())
        return {m.name: list(m.versions) for m in resp.models}

    async def get_model(self, model: str = "", version: int = 0) -> ModelInfo:
        return messages.model_info(await self._call("GetModel", pb.GetModelRequest(model=model, version=version)))

    async def classify_stream(self, batches: AsyncIterator[tuple[str, Sequence[ImageLike]]] | Iterable,
                              model: str = "", top_k: int = 5, window: int = 16,
                              target_index: int | None = None, version: int = 0) -> AsyncIterator[StreamResult]:
        """As ClassifierClient.classify_stream; `target_index` pins the stream to one target (one stream per
        replica), otherwise targets are taken round robin. Closing the iterator cancels the call."""
        responses = self.classify_stream_messages(batches, model, top_k, window, target_index, version)
        try:
            async for response in responses:
                yield messages.stream_result(response)
        except grpc.aio.AioRpcError as e:
            raise messages.client_error(e) from None
        finally:
            await responses.aclose()

    async def classify_stream_messages(self, batches: AsyncIterator[tuple[str, Sequence[ImageLike]]] | Iterable,
                                       model: str = "", top_k: int = 5, window: int = 16,
                                       target_index: int | None = None,
                                       version: int = 0) -> AsyncIterator[pb.StreamClassifyResponse]:
        """classify_stream without the conversion: the server's own messages, for callers that pass them on (a
        batch job reads thousands a second)."""
        slots = asyncio.Semaphore(window)

        async def requests():
            async for request_id, images in _aiter(batches):
                await slots.acquire()
                yield messages.stream_request(request_id, images, model, top_k, version)

        stub = self._stubs[next(self._next) if target_index is None else target_index]
        call = stub.ClassifyStream(requests(), metadata=with_trace_context(self._metadata))
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
