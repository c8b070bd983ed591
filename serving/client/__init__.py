"""The Python client for classifier.v1: sync and asyncio, numpy in / numpy out, typed results.

This package is the base install (grpcio, protobuf, numpy): it imports nothing of the server or of
training, which an import contract (`.importlinter`) checks.

    from serving.client import ClassifierClient
    with ClassifierClient("127.0.0.1:8001") as client:
        preds = client.classify(["shoe.png"], model="fashion_mnist", top_k=3)
        print(preds[0][0].label, preds[0][0].score)
        cams = client.explain(["shoe.png"], model="fashion_mnist", overlay=True)

Channels are reused across calls; several targets are used round robin (one job, many replicas); calls
that fail with UNAVAILABLE are retried by gRPC with backoff and jitter (`retry.RetryPolicy`, a service config),
then on the next target; every call has a deadline. `tls=Tls(...)`
connects with TLS (mutual TLS with a client certificate); `token=` (or $CNN_SERVING_TOKEN) is sent as
`authorization: Bearer <token>` on every call. A refused call raises a typed `ClientError` (`NotFound`,
`InvalidArgument`, `Unavailable`, `Unauthenticated`, ...; each a grpc.RpcError with `code()` and `details()`).
"""

from .aio import AsyncClassifierClient
from .connection import Tls
from .messages import (
    RETRYABLE,
    Cancelled,
    ClientError,
    DeadlineExceeded,
    Explanation,
    FailedPrecondition,
    ImageLike,
    Internal,
    InvalidArgument,
    ModelInfo,
    NotFound,
    PermissionDenied,
    Prediction,
    ResourceExhausted,
    StreamResult,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    to_wire_image,
)
from .retry import RetryPolicy, service_config_option
from .sync import ClassifierClient

__all__ = ["AsyncClassifierClient", "Cancelled", "ClassifierClient", "ClientError", "DeadlineExceeded",
           "Explanation", "FailedPrecondition", "ImageLike", "Internal", "InvalidArgument", "ModelInfo", "NotFound",
           "PermissionDenied", "Prediction", "RETRYABLE", "ResourceExhausted", "RetryPolicy", "StreamResult", "Tls",
           "Unauthenticated", "Unavailable", "Unimplemented", "service_config_option", "to_wire_image"]
