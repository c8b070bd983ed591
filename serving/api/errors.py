"""One place that maps domain errors to gRPC status codes, for every servicer."""

from __future__ import annotations

import functools
import logging

import grpc

from ..batcher import BatcherStopped, DeadlineExceeded, QueueFull
from ..model import CamUnavailable
from ..preprocess import InvalidInput
from ..repository import ModelNotFound, ModelNotReady

log = logging.getLogger("serving.api")

_CODES: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (ModelNotFound, grpc.StatusCode.NOT_FOUND),
    (ModelNotReady, grpc.StatusCode.UNAVAILABLE),
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (BatcherStopped, grpc.StatusCode.UNAVAILABLE),
    (CamUnavailable, grpc.StatusCode.FAILED_PRECONDITION),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
]


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    for cls, code in _CODES:
        if isinstance(error, cls):
            return code, str(error)
    log.exception("internal error", exc_info=error)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}"


async def abort_with(context: grpc.aio.ServicerContext, error: BaseException) -> None:
    code, message = status_of(error)
    await context.abort(code, message)


def remaining_time(context: grpc.aio.ServicerContext) -> float | None:
    """Seconds left before the caller's deadline, so queued work past it is dropped."""
    left = context.time_remaining()
    return left if left is not None and left < 1e8 else None


def status_on_error(method):
    """Every error of a unary handler becomes a gRPC status with a message (the codes are mapped above)."""
    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except Exception as e:  # noqa: BLE001 - every error becomes a status with a message
            await abort_with(context, e)
    return wrapper
