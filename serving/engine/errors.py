"""Every error the server and the engine raise on purpose, in one place.

Each class is one kind of failure with one status, named by its `status` attribute (the name of a gRPC
status code: `api/status.py` turns it into the code, so this module imports no gRPC, and the batcher and the
Ray engine can raise and name these errors too). None subclasses ValueError: a ValueError from a library is
never taken for the caller's fault. Anything that is none of these is a bug of the
server: it becomes `InternalError` at the model boundary (`ModelVersion.infer`), is logged there with its
traceback, and reaches the caller as INTERNAL with the model and version named and nothing else.
"""

from __future__ import annotations

# The longest a caller's identifier is echoed in an error message: enough for any real model name or version,
# while a name of any size (the message limit allows megabytes) costs each answer and log line a bounded size.
SHOWN_NAME_CHARS = 64


def shown(name: str) -> str:
    """A caller's identifier (model name, version string, tensor or output name, datatype) as an error message
    quotes it: repr, so control characters cannot forge log lines; past SHOWN_NAME_CHARS cut with an ellipsis
    and the full length, so the caller can tell its name was cut and by how much."""
    if len(name) <= SHOWN_NAME_CHARS:
        return repr(name)
    return f"{name[:SHOWN_NAME_CHARS]!r}... ({len(name)} characters)"


class ServingError(Exception):
    """Base of the errors below; the message is written for the caller and says what to fix. `status` names
    the gRPC status code it is answered with (and, through it, the HTTP status): the one mapping."""
    status = "INTERNAL"


class InvalidInput(ServingError):
    """Input the client must fix (INVALID_ARGUMENT)."""
    status = "INVALID_ARGUMENT"


class ModelNotFound(ServingError):
    """No such model or version (NOT_FOUND)."""
    status = "NOT_FOUND"


class ModelNotReady(ServingError):
    """The model exists but has no ready version (UNAVAILABLE)."""
    status = "UNAVAILABLE"


class QueueFull(ServingError):
    """The batcher's queue holds max_queue_size requests already (RESOURCE_EXHAUSTED)."""
    status = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(ServingError):
    """The request's deadline passed before its batch ran (DEADLINE_EXCEEDED)."""
    status = "DEADLINE_EXCEEDED"


class BatcherStopped(ServingError):
    """The model version is shutting down or being replaced (UNAVAILABLE: retry, another version serves)."""
    status = "UNAVAILABLE"


class CamUnsupported(ServingError):
    """The model has no linear map from feature maps to logits (FAILED_PRECONDITION)."""
    status = "FAILED_PRECONDITION"


class NotInstalled(ServingError):
    """A feature asked for needs a package this install lacks (FAILED_PRECONDITION); says which extra."""
    status = "FAILED_PRECONDITION"


class Unauthenticated(ServingError):
    """The call carries no token, or one the server does not know (UNAUTHENTICATED)."""
    status = "UNAUTHENTICATED"


class PermissionDenied(ServingError):
    """A valid token that does not allow this call: an inference token on a management RPC (PERMISSION_DENIED)."""
    status = "PERMISSION_DENIED"


class ShuttingDown(ServingError):
    """The server is draining before it exits and takes no new calls (UNAVAILABLE: retry on another replica)."""
    status = "UNAVAILABLE"


class InternalError(ServingError):
    """A failure inside the server, already logged with its traceback (INTERNAL)."""
    status = "INTERNAL"


class StartRefused(ServingError):
    """A start the server refuses (a flag, a file, a port, a missing extra): the one-line reason and what to
    change. The command line prints it without a traceback."""


class SiblingRefused(ServingError):
    """What another worker of the same server (`serve --workers N`) answered to its half of a call: the caller
    gets the status and message that worker gave."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status
