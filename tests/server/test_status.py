"""Errors reach the caller with the right status: each error the server raises on purpose has its code;
a failure that is none of them (a bug) is INTERNAL, names the model and version, leaks nothing, and is
logged with its traceback."""

import logging

import grpc
import numpy as np
import pytest

from serving.client import ClassifierClient
from serving.engine.errors import (
    BatcherStopped,
    CamUnsupported,
    DeadlineExceeded,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    PermissionDenied,
    QueueFull,
    ShuttingDown,
    Unauthenticated,
)
from serving.server.api.status import status_of
from tests.conftest import running_server


@pytest.mark.parametrize("error, code", [
    (InvalidInput("x"), grpc.StatusCode.INVALID_ARGUMENT),
    (ModelNotFound("x"), grpc.StatusCode.NOT_FOUND),
    (ModelNotReady("x"), grpc.StatusCode.UNAVAILABLE),
    (QueueFull("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DeadlineExceeded("x"), grpc.StatusCode.DEADLINE_EXCEEDED),
    (BatcherStopped("x"), grpc.StatusCode.UNAVAILABLE),
    (CamUnsupported("x"), grpc.StatusCode.FAILED_PRECONDITION),
    (Unauthenticated("x"), grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied("x"), grpc.StatusCode.PERMISSION_DENIED),
    (ShuttingDown("x"), grpc.StatusCode.UNAVAILABLE),
])
def test_each_deliberate_error_has_its_code(error, code):
    assert status_of(error) == (code, "x")


def test_a_plain_value_error_is_not_blamed_on_the_caller(caplog):
    with caplog.at_level(logging.ERROR, logger="serving.api"):
        code, message = status_of(ValueError("/srv/secret/path is broken"))
    assert code == grpc.StatusCode.INTERNAL and "secret" not in message
    assert "secret" in caplog.text  # the server's log has it


def test_a_failure_inside_the_model_is_internal_named_and_logged(small_repo, caplog):
    with running_server(small_repo) as server:
        mv = server.server.repository.get("fmnist")

        def broken(*args, **kwargs):
            raise ValueError("onnxruntime said something about /srv/secret/model.onnx")

        mv.sessions.run = broken  # the real sessions, made to fail as a server-side bug would
        with caplog.at_level(logging.ERROR, logger="serving.model"), ClassifierClient(server.address) as client:
            with pytest.raises(grpc.RpcError) as failure:
                client.classify([np.zeros((28, 28), np.uint8)])
    assert failure.value.code() == grpc.StatusCode.INTERNAL
    details = failure.value.details()
    assert "fmnist" in details and "version 1" in details and "secret" not in details
    assert "secret" in caplog.text and "Traceback" in caplog.text
