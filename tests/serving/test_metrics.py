"""Prometheus metrics, scraped over HTTP from the real server after real requests."""

import re
import socket
import time
import urllib.request

import grpc
import numpy as np
import pytest

from serving.client import ClassifierClient
from tests.conftest import running_server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def value(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{{{want}}} not in metrics")


def test_metrics_count_requests_batches_and_failures(small_repo):
    port = free_port()
    with running_server(small_repo, metrics_port=port) as server, ClassifierClient(server.address) as client:
        client.classify([np.zeros((28, 28), np.uint8)] * 3)
        client.classify([np.zeros((28, 28), np.uint8)])
        with pytest.raises(grpc.RpcError):
            client.classify([b"junk"])
        # The caller hears the status before the server's handler has finished counting it: wait for it.
        failed_call = 'grpc_requests_total{code="INVALID_ARGUMENT",method="Classify"}'
        deadline = time.monotonic() + 5
        while True:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            if failed_call in text or time.monotonic() > deadline:
                break
            time.sleep(0.02)
    assert value(text, "inference_requests_total", model="fmnist", version="1") == 3
    assert value(text, "inference_failures_total", model="fmnist", version="1") == 1
    assert value(text, "inference_batch_size_sum", model="fmnist", version="1") == 5
    assert value(text, "inference_compute_seconds_count", model="fmnist", version="1") == 3
    assert value(text, "grpc_requests_total", method="Classify", code="OK") == 2
    assert value(text, "grpc_requests_total", method="Classify", code="INVALID_ARGUMENT") == 1
    assert re.search(r'grpc_requests_in_flight\{method="Classify"\} 0', text)

