"""The one mapping from the server's errors (`server/errors.py`) to gRPC status codes, for every servicer.

The mapping is narrow on purpose: only the errors the server raises on purpose get the status that blames
or informs the caller. Anything else is a server bug: it is logged with its traceback and answered
INTERNAL without its text, which may hold paths or internals.
"""

from __future__ import annotations

import functools
import logging

import grpc

from ..errors import (
    BatcherStopped,
    CamUnsupported,
    DeadlineExceeded,
    InternalError,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    NotInstalled,
    PermissionDenied,
    QueueFull,
    ServingError,
    ShuttingDown,
    Unauthenticated,
)

log = logging.getLogger("serving.api")

_CODES: dict[type[ServingError], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    ModelNotReady: grpc.StatusCode.UNAVAILABLE,
    QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    BatcherStopped: grpc.StatusCode.UNAVAILABLE,
    CamUnsupported: grpc.StatusCode.FAILED_PRECONDITION,
    NotInstalled: grpc.StatusCode.FAILED_PRECONDITION,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    ShuttingDown: grpc.StatusCode.UNAVAILABLE,
    InternalError: grpc.StatusCode.INTERNAL,  # logged where it was raised, with the traceback
}


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    for cls in type(error).__mro__:
        if cls in _CODES:
            return _CODES[cls], str(error)
    log.error("internal error", exc_info=error)
    return grpc.StatusCode.INTERNAL, "internal error; the server log has the details"


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
            code, message = status_of(e)
            await context.abort(code, message)
    return wrapper
