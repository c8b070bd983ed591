"""Prometheus metrics, scraped over HTTP from the real server after real requests."""

import re
import socket
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest

from serving.client import ClassifierClient
from serving.server.metrics import TRITON_NAMES
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
    # A bad image is the caller's mistake, counted apart from the server's own failures.
    assert value(text, "inference_failures_total", model="fmnist", version="1") == 0
    assert value(text, "inference_client_errors_total", model="fmnist", version="1") == 1
    assert value(text, "inference_batch_size_sum", model="fmnist", version="1") == 5
    assert value(text, "inference_compute_seconds_count", model="fmnist", version="1") == 3
    assert value(text, "grpc_requests_total", method="Classify", code="OK") == 2
    assert value(text, "grpc_requests_total", method="Classify", code="INVALID_ARGUMENT") == 1
    assert re.search(r'grpc_requests_in_flight\{method="Classify"\} 0', text)

    # Triton's per-request series: the two successful requests, with queue + compute <= their whole time.
    v = dict(model="fmnist", version="1")
    assert value(text, "inference_request_success_total", **v) == 2
    assert value(text, "inference_count_total", **v) == 5 and value(text, "inference_exec_count_total", **v) == 3
    assert value(text, "inference_request_duration_seconds_count", **v) == 2
    parts = sum(value(text, f"inference_{p}_duration_seconds_sum", **v)
                for p in ("queue", "compute_input", "compute_infer", "compute_output"))
    assert 0 < parts <= value(text, "inference_request_duration_seconds_sum", **v)


def test_metrics_have_process_and_python_series_no_created_twins_and_every_triton_name(small_repo):
    port = free_port()
    with running_server(small_repo, metrics_port=port):
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        with pytest.raises(urllib.error.HTTPError) as other_path:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10)
    assert other_path.value.code == 404
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds"} <= names
    assert {"python_info", "python_gc_collections_total"} <= names
    assert not [n for n in names if n.endswith("_created")]
    for ours in TRITON_NAMES:  # every name of the documented mapping is served
        assert ours in names or f"{ours}_count" in names, ours

