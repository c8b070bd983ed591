"""Fault isolation on the real server: an onnxruntime error fails only its batch; a served model file deleted
or rewritten on disk while polling leaves the version serving; a client that leaves a stream frees its queued
work; aged connections are replaced without failing a call."""

from __future__ import annotations

import logging
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest

from serving.client import ClassifierClient, messages
from serving.server.connections import ConnectionLimits
from serving.wire.classifier.v1 import classifier_pb2_grpc
from tests.conftest import export_small, running_server
from tests.server.test_metrics import free_port, value

tg = pytest.importorskip("tritonclient.grpc")

IMAGE = np.zeros((28, 28), np.uint8)


def wait_for(predicate, timeout_s: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if result := predicate():
            return result
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class CountedRuns:
    """The version's real onnxruntime sessions, with each run counted; `fail_next` makes the next run a real
    onnxruntime error (the batch handed over cut to a wrong shape), `delay_s` makes each run slower."""

    def __init__(self, server, delay_s: float = 0.0):
        self.sessions = server.server.repository.get("fmnist").sessions
        self.run, self.delay_s = self.sessions.run, delay_s
        self.count, self.fail_next = 0, False
        self.sessions.run = self

    def __call__(self, x, *args, **kwargs):
        self.count += 1
        if self.fail_next:
            self.fail_next = False
            return self.run(x[:, :, :5], *args, **kwargs)  # onnxruntime refuses the shape: a genuine error
        time.sleep(self.delay_s)
        return self.run(x, *args, **kwargs)


def test_an_onnxruntime_error_fails_only_its_batch(tmp_path, caplog):
    export_small(tmp_path)
    port = free_port()
    # Requests wait up to 200 ms to share a batch: the four sent together form one.
    overrides = {"max_queue_delay_us": 200_000, "inline_budget_us": 0}
    with running_server(tmp_path, metrics_port=port, batching_overrides=overrides) as server, \
            ClassifierClient(server.address, retries=0) as client, caplog.at_level(logging.ERROR):
        runs = CountedRuns(server)
        runs.fail_next = True
        request = messages.classify_request([IMAGE], "", 0, 1)
        with grpc.insecure_channel(server.address) as channel:
            classify = classifier_pb2_grpc.ClassifierStub(channel).Classify
            failed = [classify.future(request) for _ in range(4)]
            codes = []
            for call in failed:
                with pytest.raises(grpc.RpcError) as failure:
                    call.result(30)
                codes.append(failure.value.code())
                assert "fmnist" in failure.value.details() and "version 1" in failure.value.details()
                assert "onnxruntime" not in failure.value.details()  # the internals stay in the log
        assert codes == [grpc.StatusCode.INTERNAL] * 4 and runs.count == 1
        assert client.classify([IMAGE] * 3)[0]  # the next batch runs
        assert runs.count == 2

        def scraped_after_the_failures() -> str | None:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            return text if 'code="INTERNAL"' in text else None

        text = wait_for(scraped_after_the_failures, what="the failed calls to be counted")
    assert value(text, "inference_failures_total", model="fmnist", version="1") == 4
    assert value(text, "grpc_requests_total", method="Classify", code="INTERNAL") == 4
    assert "Traceback" in caplog.text and "onnxruntime" in caplog.text


def test_a_served_file_deleted_or_rewritten_keeps_its_version_serving(tmp_path, caplog):
    export_small(tmp_path)
    model_file = tmp_path / "fmnist" / "1" / "model.onnx"
    with running_server(tmp_path, poll_interval_s=0.1) as server, ClassifierClient(server.address, retries=0) as client, \
            caplog.at_level(logging.WARNING, logger="serving.repository"):
        triton = tg.InferenceServerClient(server.address)

        def reason() -> str:
            index = triton.get_model_repository_index(as_json=True)["models"]
            (entry,) = [m for m in index if m.get("version") == "1"]
            assert entry["state"] == "READY"
            return entry.get("reason", "")

        expected = client.classify([IMAGE])
        model_file.write_bytes(b"corrupted: not an onnx file any more")
        assert "changed on disk" in wait_for(reason, what="the rewritten file to be reported")
        assert client.classify([IMAGE]) == expected
        model_file.unlink()
        assert "gone from disk" in wait_for(lambda: "gone" in reason() and reason(), what="the deleted file")
        assert client.classify([IMAGE]) == expected
        assert client.get_model("fmnist").versions[0][2].startswith("model file is gone")
        triton.close()
    assert "changed on disk" in caplog.text and "gone from disk" in caplog.text


def test_a_client_leaving_a_stream_frees_its_queued_work(tmp_path):
    export_small(tmp_path)
    overrides = {"max_batch_size": 1, "inline_budget_us": 0}  # one request per batch, 50 ms each
    with running_server(tmp_path, batching_overrides=overrides) as server, ClassifierClient(server.address) as client:
        runs = CountedRuns(server, delay_s=0.05)
        batcher = server.server.repository.get("fmnist").batcher
        stream = client.classify_stream(((str(i), [IMAGE]) for i in range(40)), window=40)
        assert next(stream).request_id == "0"
        wait_for(lambda: batcher.queued > 10, what="the stream's requests to be queued")
        stream.close()  # the client goes away
        wait_for(lambda: batcher.queued == 0, timeout_s=5, what="the queue to empty")
        ran = runs.count
        time.sleep(0.3)
        assert runs.count <= ran + 1 and ran < 20  # the rest never ran
        assert client.classify([IMAGE])[0]


def test_aged_connections_are_replaced_without_failing_a_call(small_repo):
    with running_server(small_repo, connections=ConnectionLimits(age_s=0.3, age_grace_s=5)) as server:
        channel = grpc.insecure_channel(server.address)  # the connection whose replacements are counted
        classify = classifier_pb2_grpc.ClassifierStub(channel).Classify
        request = messages.classify_request([IMAGE], "", 0, 1)
        states = []
        channel.subscribe(states.append, try_to_connect=True)
        stop, failures, calls = threading.Event(), [], [0]

        def call_in_a_loop():
            while not stop.is_set():
                try:
                    classify(request, timeout=10)
                    calls[0] += 1
                except grpc.RpcError as e:
                    failures.append(e.code())

        workers = [threading.Thread(target=call_in_a_loop) for _ in range(3)]
        for w in workers:
            w.start()
        time.sleep(1.5)
        stop.set()
        for w in workers:
            w.join(10)
        channel.close()
    connected = sum(1 for s in states if s == grpc.ChannelConnectivity.READY)
    print(f"\n{calls[0]} calls over 1.5 s with connections aged out after 0.3 s: {connected} connections, "
          f"{len(failures)} failed")
    assert not failures and calls[0] > 50
    assert connected >= 2  # reconnected when the server aged the connection out (once per 0.3 s, give or take)
