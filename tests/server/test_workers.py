"""`serve --workers N`: real supervisors and workers (`python -m serving serve`), real clients on fresh
connections (the kernel spreads connections, not calls, over the workers), and each worker's own view read
on its private socket, where its siblings reach it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
import urllib.request
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest

from serving.server.api.siblings import METHODS, SERVICE
from serving.server.cli import worker_count
from serving.server.supervisor import hold_port, resolve_workers
from serving.wire.inference import grpc_service_pb2 as kpb
from serving.wire.inference import grpc_service_pb2_grpc as kgrpc
from tests.cli_run import ServeProcess, one_line_error, run_module
from tests.conftest import export_small

tg = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

MODEL = "fmnist"
# A connection of its own: gRPC shares one connection among a process's channels to the same target otherwise.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


class Workers(ServeProcess):
    """`python -m serving serve --workers N` on a free port; its log kept."""

    def __init__(self, repository: Path, *flags: str, workers: int = 2, env: dict | None = None):
        super().__init__(repository, "--workers", str(workers), *flags, env=env)

    def workers(self) -> dict[int, tuple[int, str]]:
        """index -> (pid, private directory) of each worker process now running."""
        found = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != self.proc.pid:
                    continue
                argv = (stat.parent / "cmdline").read_bytes().split(b"\0")
            except (OSError, ValueError, IndexError):
                continue
            if b"serving.server.worker" in argv:
                at = argv.index(b"serving.server.worker")
                found[int(argv[at + 2])] = (int(stat.parent.name), argv[at + 1].decode())
        return found


def free_port() -> int:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        return free.getsockname()[1]


def on_worker(directory: str, index: int, method: str, request):
    """A worker's own answer (the local half of `method`), on its private socket."""
    request_type, response_type = METHODS[method]
    with grpc.insecure_channel(f"unix:{directory}/worker-{index}.sock") as channel:
        call = channel.unary_unary(f"/{SERVICE}/{method}", request_serializer=request_type.SerializeToString,
                                   response_deserializer=response_type.FromString)
        return call(request, timeout=10)


def states(server: Workers) -> dict[int, dict[tuple[str, str], str]]:
    """Each worker's own repository index: (model, version) -> state."""
    answers = {}
    for index, (_, directory) in server.workers().items():
        try:
            index_ = on_worker(directory, index, "RepositoryIndex", kpb.RepositoryIndexRequest())
        except grpc.RpcError:  # a worker still starting: not listening yet
            continue
        answers[index] = {(m.name, m.version): m.state for m in index_.models}
    return answers


def infer_request(n: int = 1) -> kpb.ModelInferRequest:
    x = np.zeros((n, 1, 28, 28), np.uint8)
    return kpb.ModelInferRequest(model_name=MODEL, inputs=[kpb.ModelInferRequest.InferInputTensor(
        name="input", datatype="UINT8", shape=x.shape)], raw_input_contents=[x.tobytes()])


@pytest.fixture()
def repo(small_repo, tmp_path) -> Path:
    """A repository of its own (tests here change it), with the session's exported model."""
    import shutil
    shutil.copytree(small_repo, tmp_path / "repo")
    return tmp_path / "repo"


# -- the flag ----------------------------------------------------------------------------------------------------
def test_the_workers_flag_and_auto():
    assert worker_count("3") == 3 and worker_count(" AUTO ") == "auto"
    with pytest.raises(ValueError):
        worker_count("0")
    auto = resolve_workers("auto")
    assert 1 <= auto <= 8 and auto <= len(os.sched_getaffinity(0))


def test_a_port_taken_by_another_program_or_a_missing_file_is_refused_in_one_line(small_repo):
    with socket.socket() as other:  # another program's listener, without SO_REUSEPORT
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        started = time.monotonic()
        result = run_module("serving", "serve", "--model-repository", small_repo, "--port", port, "--workers", "2",
                            timeout=30)
        assert f"cannot listen on 127.0.0.1:{port}: the port is taken" in one_line_error(result)
        assert time.monotonic() - started < 20
        result = run_module("serving", "serve", "--model-repository", small_repo, "--port", "0", "--http-port", port,
                            "--workers", "2", timeout=30)
        assert "the port is taken" in one_line_error(result) and "--http-port" in one_line_error(result)
    # What every worker would refuse is refused once, before any starts.
    result = run_module("serving", "serve", "--model-repository", small_repo, "--port", "0", "--workers", "2",
                        "--tls-cert", "missing.pem", "--tls-key", "missing.pem", timeout=30)
    assert "missing.pem" in one_line_error(result)
    # The supervisor's hold keeps a program that does not share ports out for as long as it serves.
    held, port = hold_port("127.0.0.1", 0)
    try:
        with socket.socket() as late, pytest.raises(OSError):
            late.bind(("127.0.0.1", port))
    finally:
        for sock in held:
            sock.close()


# -- one server to the outside ------------------------------------------------------------------------------------
def test_a_management_call_through_one_connection_reaches_every_worker(repo):
    server = Workers(repo, "--poll-interval", "0.3")
    try:
        assert len(server.workers()) == 2
        with grpc.insecure_channel(server.address, options=OWN_CONNECTION) as channel:
            stub = kgrpc.GRPCInferenceServiceStub(channel)
            stub.RepositoryModelUnload(kpb.RepositoryModelUnloadRequest(model_name=MODEL), timeout=30)
            assert [s[(MODEL, "1")] for s in states(server).values()] == ["UNAVAILABLE"] * 2
            index = stub.RepositoryIndex(kpb.RepositoryIndexRequest(), timeout=10)
            assert [(m.name, m.version, m.state) for m in index.models] == [(MODEL, "1", "UNAVAILABLE")]
            stub.RepositoryModelLoad(kpb.RepositoryModelLoadRequest(model_name=MODEL), timeout=30)
            assert [s[(MODEL, "1")] for s in states(server).values()] == ["READY"] * 2
            # A new version on disk: worker 0 scans, and every worker serves it.
            export_small(repo, MODEL, version=2, seed=1)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                if all(s.get((MODEL, "2")) == "READY" for s in states(server).values()):
                    break
                time.sleep(0.2)
            assert [s.get((MODEL, "2")) for s in states(server).values()] == ["READY"] * 2
            index = stub.RepositoryIndex(kpb.RepositoryIndexRequest(ready=True), timeout=10)
            assert {(m.version, m.state) for m in index.models} == {("2", "READY")}
            # The log level, too, is every worker's.
            stub.LogSettings(kpb.LogSettingsRequest(settings={"log_verbose_level": kpb.LogSettingsRequest.SettingValue(
                uint32_param=1)}), timeout=10)
            for i, (_, directory) in server.workers().items():
                levels = on_worker(directory, i, "LogSettings", kpb.LogSettingsRequest())
                assert levels.settings["log_verbose_level"].uint32_param == 1
        assert server.stop() == 0
    finally:
        server.stop()


def test_statistics_and_metrics_add_up_across_workers(repo):
    metrics_port, rest_port = free_port(), free_port()
    server = Workers(repo, "--metrics-port", str(metrics_port), "--http-port", str(rest_port))
    try:
        calls = 0
        for _ in range(24):  # 24 connections: each lands on one worker or the other
            with grpc.insecure_channel(server.address, options=OWN_CONNECTION) as channel:
                stub = kgrpc.GRPCInferenceServiceStub(channel)
                for _ in range(3):
                    stub.ModelInfer(infer_request(2), timeout=30)
                    calls += 1
        shares = [on_worker(d, i, "ModelStatistics", kpb.ModelStatisticsRequest(name=MODEL)).model_stats[0]
                  for i, (_, d) in server.workers().items()]
        assert all(s.inference_stats.success.count > 0 for s in shares), "connections all on one worker"
        with grpc.insecure_channel(server.address, options=OWN_CONNECTION) as channel:
            whole = kgrpc.GRPCInferenceServiceStub(channel).ModelStatistics(
                kpb.ModelStatisticsRequest(name=MODEL), timeout=10).model_stats[0]
        assert whole.inference_stats.success.count == calls == sum(s.inference_stats.success.count for s in shares)
        assert whole.inference_count == 2 * calls
        assert whole.execution_count == sum(s.execution_count for s in shares)
        assert whole.inference_stats.queue.ns == sum(s.inference_stats.queue.ns for s in shares)
        assert sum(b.compute_infer.count for b in whole.batch_stats) == whole.execution_count
        # Prometheus: the supervisor's port sums the workers' series.
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        success = [line for line in text.splitlines() if line.startswith("inference_request_success_total{")]
        assert success and float(success[0].rsplit(" ", 1)[1]) == calls
        # REST: the same whole-server statistics, from whichever worker its connection reached.
        for _ in range(4):
            stats = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{rest_port}/v2/models/{MODEL}/stats",
                                                      timeout=10).read())
            assert int(stats["model_stats"][0]["inference_stats"]["success"]["count"]) == calls
        assert server.stop() == 0
    finally:
        server.stop()


# -- failures and the drain -----------------------------------------------------------------------------------------
def test_a_killed_worker_is_replaced_while_the_other_serves(repo):
    server = Workers(repo)
    try:
        before = server.workers()
        os.kill(before[1][0], signal.SIGKILL)
        # Its listener closes once its last thread has ended: when the supervisor has seen it exit.
        while f"(pid {before[1][0]}) exited" not in server.log():
            time.sleep(0.01)
        answered = 0
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # new connections meanwhile: every call answered
            with grpc.insecure_channel(server.address, options=OWN_CONNECTION) as channel:
                kgrpc.GRPCInferenceServiceStub(channel).ModelInfer(infer_request(), timeout=10)
                answered += 1
            now = server.workers()
            if 1 in now and now[1][0] != before[1][0] and states(server).get(1, {}).get((MODEL, "1")) == "READY":
                break
        assert now[0] == before[0] and now[1][0] != before[1][0], server.log()
        assert answered > 0 and "worker 1" in server.log() and "starting it again" in server.log()
        assert server.stop() == 0
    finally:
        server.stop()


def test_sigterm_with_two_workers_under_load_loses_nothing(repo):
    """16 tritonclient.grpc.aio callers, each on its own connection and without retries, send their next call the
    moment the last one ends; SIGTERM after 2 s. Every call ends OK or UNAVAILABLE, never CANCELLED or another
    status, and the server exits 0."""
    import tritonclient.grpc.aio as triton_aio

    server = Workers(repo, "--max-queue-delay-us", "2000")
    codes: Counter = Counter()

    async def caller(stop: asyncio.Event) -> None:
        client = triton_aio.InferenceServerClient(server.address, channel_args=[
            *OWN_CONNECTION, ("grpc.max_receive_message_length", 1 << 26)])
        x = tg.InferInput("input", [2, 1, 28, 28], "UINT8")
        x.set_data_from_numpy(np.zeros((2, 1, 28, 28), np.uint8))
        try:
            while not stop.is_set():
                try:
                    await client.infer(MODEL, [x], client_timeout=30)
                    codes["OK"] += 1
                except InferenceServerException as e:
                    codes[str(e.status()).removeprefix("StatusCode.")] += 1
                    if server.proc.poll() is not None:
                        await asyncio.sleep(0.01)
        finally:
            await client.close()

    async def main() -> None:
        stop = asyncio.Event()
        callers = [asyncio.create_task(caller(stop)) for _ in range(16)]
        await asyncio.sleep(2)
        server.proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        while server.proc.poll() is None and time.monotonic() - started < 20:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        stop.set()
        await asyncio.gather(*callers)

    try:
        asyncio.run(main())
        assert server.proc.wait(5) == 0, server.log()
    finally:
        server.stop()
    assert set(codes) <= {"OK", "UNAVAILABLE"}, codes
    assert codes["OK"] > 50
    assert server.log().count("drained: every accepted call answered") == 2


def test_two_workers_with_tokens_and_tls(small_repo, tmp_path):
    from tests.pki import make_pki
    pki = make_pki(tmp_path / "pki")
    (tmp_path / "tokens").write_text("inference-token-of-the-test\n")
    (tmp_path / "admin").write_text("admin-token-of-the-test\n")
    server = Workers(small_repo, "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
                     "--auth-token-file", str(tmp_path / "tokens"), "--admin-token-file", str(tmp_path / "admin"))
    try:
        credentials = grpc.ssl_channel_credentials(pki.ca.read_bytes())
        for token, unload in (("inference-token-of-the-test", grpc.StatusCode.PERMISSION_DENIED),
                              ("admin-token-of-the-test", None)):
            metadata = [("authorization", f"Bearer {token}")]
            for _ in range(6):  # several connections, so both workers answer
                with grpc.secure_channel(server.address, credentials, options=OWN_CONNECTION) as channel:
                    stub = kgrpc.GRPCInferenceServiceStub(channel)
                    assert stub.ModelInfer(infer_request(), metadata=metadata, timeout=10).outputs
                    with pytest.raises(grpc.RpcError) as refused:
                        stub.ModelInfer(infer_request(), timeout=10)
                    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with grpc.secure_channel(server.address, credentials, options=OWN_CONNECTION) as channel:
                stub = kgrpc.GRPCInferenceServiceStub(channel)
                if unload is None:
                    stub.RepositoryModelUnload(kpb.RepositoryModelUnloadRequest(model_name=MODEL), metadata=metadata,
                                               timeout=30)
                else:
                    with pytest.raises(grpc.RpcError) as refused:
                        stub.RepositoryModelUnload(kpb.RepositoryModelUnloadRequest(model_name=MODEL),
                                                   metadata=metadata, timeout=30)
                    assert refused.value.code() == unload
        assert [s[(MODEL, "1")] for s in states(server).values()] == ["UNAVAILABLE"] * 2
        assert server.stop() == 0
    finally:
        server.stop()
