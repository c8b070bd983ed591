"""The server's errors (`engine/errors.py`, each naming its status) as gRPC status codes, for every servicer.

The mapping is narrow on purpose: only the errors the server raises on purpose get the status that blames
or informs the caller. Anything else is a server bug: it is logged with its traceback and answered
INTERNAL without its text, which may hold paths or internals.
"""

from __future__ import annotations

import logging

import grpc

from ...engine.errors import ServingError

log = logging.getLogger("serving.api")


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(error, ServingError):
        return grpc.StatusCode[error.status], str(error)
    log.error("internal error", exc_info=error)
    return grpc.StatusCode.INTERNAL, "internal error; the server log has the details"


def remaining_time(context: grpc.aio.ServicerContext) -> float | None:
    """Seconds left before the caller's deadline, so queued work past it is dropped."""
    left = context.time_remaining()
    return left if left is not None and left < 1e8 else None
