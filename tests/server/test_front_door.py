"""The front door against hostile and mistaken callers, with the real server and real clients, some of them
raw HTTP/2 (h2): memory a caller without a token can make the server hold, client mistakes answered with
their own status and no traceback, no token in any log line, strict readiness, management under mutual TLS,
bounded connections and reset floods, the metrics port and the audit line of refused calls."""

from __future__ import annotations

import logging
import re
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import h2.config
import h2.connection
import h2.events
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.client import ClassifierClient, Tls
from serving.server.access import TlsFiles
from serving.server.connections import ConnectionLimits
from serving.wire.inference import grpc_service_pb2 as pb
from serving.wire.inference import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import export_small, running_server
from tests.pki import make_pki
from tests.server.test_metrics import free_port, value

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from front_door import reset_flood  # noqa: E402
from unauthenticated_burst import ServerProcess, memory_mb, run_burst  # noqa: E402

tg = pytest.importorskip("tritonclient.grpc")

TOKEN = "front-door-token-0123456789abcdef"
ADMIN = "front-door-admin-0123456789abcdef"
BEARER = [("authorization", f"Bearer {TOKEN}")]
IMAGE = np.zeros((28, 28), np.uint8)
INFER = "/inference.GRPCInferenceService/ModelInfer"
CLASSIFY = "/classifier.v1.Classifier/Classify"
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def token_server(small_repo):
    with running_server(small_repo, inference_tokens=(TOKEN,), admin_tokens=(ADMIN,)) as s:
        yield s


def server_logs(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith(("serving", "grpc"))]


# -- 1. memory before authentication -----------------------------------------------------------------------------
def test_a_burst_without_a_token_holds_almost_no_memory():
    """24 concurrent calls of 40 MB (plain) and of 40 MB gzip-compressed to 40 KB held 1 GB and more before the
    body was read after the token check; now a refused call's body is never read."""
    server = ServerProcess()
    try:
        before, _ = memory_mb(server.proc.pid)
        for kind in ("plain", "gzip"):
            burst = run_burst(server, kind, calls=24, mb=40)
            assert burst.codes == {"UNAUTHENTICATED": 24}, burst
        after, peak = memory_mb(server.proc.pid)
    finally:
        server.stop()
    print(f"\nRSS {before:.0f} MB -> peak {peak:.0f} MB, after {after:.0f} MB for 2 x 24 calls of 40 MB without a token")
    assert peak - before < 48, (before, peak)


# -- 4. client mistakes: their own status, one log line at most, no token ------------------------------------------
def raw_call(address: str, method: str, body: bytes, metadata=()) -> grpc.RpcError | bytes:
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        try:
            return call(body, metadata=list(metadata), timeout=10)
        except grpc.RpcError as e:
            return e


def test_a_malformed_body_is_invalid_argument_and_never_unknown(token_server, caplog):
    for method in (INFER, CLASSIFY):
        refused = raw_call(token_server.address, method, b"\xff\xff\xff")
        assert refused.code() == grpc.StatusCode.UNAUTHENTICATED, method  # the body is not even read
        wrong = raw_call(token_server.address, method, b"\xff\xff\xff", BEARER)
        assert wrong.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, wrong)
        assert "not a valid message" in wrong.details()
    assert not [r for r in server_logs(caplog) if r.levelno >= logging.ERROR or r.exc_info]


def test_huge_numbers_in_strings_are_invalid_argument(token_server, caplog):
    digits = "7" * 4301  # over int()'s 4,300-digit limit: a ValueError that surfaced as INTERNAL
    stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(token_server.address))
    infer = pb.ModelInferRequest(model_name="fmnist", model_version=digits)
    infer.inputs.add(name="input", datatype="UINT8", shape=[1, 28, 28])
    infer.raw_input_contents.append(IMAGE.tobytes())
    timed = pb.ModelInferRequest()
    timed.CopyFrom(infer)
    timed.model_version = ""
    timed.parameters["timeout"].string_param = digits
    calls = [lambda: stub.ModelInfer(infer, metadata=BEARER), lambda: stub.ModelInfer(timed, metadata=BEARER),
             lambda: stub.ModelReady(pb.ModelReadyRequest(name="fmnist", version=digits)),
             lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name="fmnist", version=digits), metadata=BEARER)]
    for call in calls:
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value
        assert len(e.value.details()) < 300  # the number is not echoed back
    assert not [r for r in server_logs(caplog) if r.levelno >= logging.ERROR or r.exc_info]


def test_a_malformed_message_in_a_stream_ends_it_invalid_argument_after_the_good_ones(token_server):
    good = pb.ModelInferRequest(model_name="fmnist", id="good")
    good.inputs.add(name="input", datatype="UINT8", shape=[1, 28, 28])
    good.raw_input_contents.append(IMAGE.tobytes())
    with grpc.insecure_channel(token_server.address) as channel:
        stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer",
                                       request_serializer=None, response_deserializer=pb.ModelStreamInferResponse.FromString)
        answers = stream(iter([good.SerializeToString(), b"\xff\xff\xff"]), metadata=BEARER, timeout=10)
        received = []
        with pytest.raises(grpc.RpcError) as e:
            for answer in answers:
                received.append(answer.infer_response.id)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert received == ["good"]


class RawHttp2:
    """A bare HTTP/2 client connection (h2), for what gRPC's own clients refuse to send."""

    def __init__(self, port: int, host: str = "127.0.0.1"):
        self.sock = socket.create_connection((host, port), timeout=10)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None,
                                                                         validate_outbound_headers=False))
        self.conn.initiate_connection()
        self.flush()

    def flush(self) -> None:
        self.sock.sendall(self.conn.data_to_send())

    def headers(self, method: str, *extra: tuple[bytes, bytes], end_stream: bool = False) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        self.conn.send_headers(stream_id, [(b":method", b"POST"), (b":scheme", b"http"), (b":path", method.encode()),
                                           (b":authority", b"127.0.0.1"), (b"content-type", b"application/grpc"),
                                           (b"te", b"trailers"), *extra], end_stream=end_stream)
        return stream_id

    def call(self, method: str, body: bytes, *extra: tuple[bytes, bytes]) -> str:
        """One unary call; its grpc-status."""
        stream_id = self.headers(method, *extra)
        self.conn.send_data(stream_id, b"\x00" + len(body).to_bytes(4, "big") + body, end_stream=True)
        self.flush()
        while True:
            data = self.sock.recv(65536)
            assert data, "connection closed"
            for event in self.conn.receive_data(data):
                if isinstance(event, (h2.events.TrailersReceived, h2.events.ResponseReceived)):
                    status = dict(event.headers).get(b"grpc-status")
                    if status is not None:
                        return status.decode()
            self.flush()

    def close(self) -> None:
        self.sock.close()


def test_a_token_that_is_not_utf8_is_refused_and_never_logged(token_server, caplog):
    secret = b"not-utf8-\xff\xfe-" + TOKEN.encode()
    client = RawHttp2(token_server.port)
    try:
        status = client.call(INFER, b"", (b"authorization", b"Bearer " + secret))
    finally:
        client.close()
    assert status == str(grpc.StatusCode.UNAUTHENTICATED.value[0])
    text = "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert TOKEN not in text and "not-utf8" not in text
    assert not [r for r in caplog.records if r.exc_info]


# -- 5. strict readiness -------------------------------------------------------------------------------------------
def readiness(address: str) -> tuple[int, bool, bool]:
    """What grpc.health.v1, KServe's ServerReady and tritonclient each say."""
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        ready = pb_grpc.GRPCInferenceServiceStub(channel).ServerReady(pb.ServerReadyRequest(), timeout=5)
    triton = tg.InferenceServerClient(address).is_server_ready()
    return health.status, ready.ready, triton


def liveness(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="liveness"),
                                                         timeout=5).status


def test_an_empty_repository_is_not_ready_unless_relaxed(tmp_path):
    with running_server(tmp_path) as server:
        assert readiness(server.address) == (NOT_SERVING, False, False)
        assert liveness(server.address) == SERVING  # a liveness probe must not restart it for that
    with running_server(tmp_path, strict_readiness=False) as server:
        assert readiness(server.address) == (SERVING, True, True)


def test_a_corrupt_model_makes_the_server_not_ready(tmp_path, caplog):
    export_small(tmp_path, "good")
    export_small(tmp_path, "broken")
    (tmp_path / "broken" / "1" / "model.onnx").write_bytes(b"not an onnx file")
    with running_server(tmp_path) as server:
        assert readiness(server.address) == (NOT_SERVING, False, False)
        with ClassifierClient(server.address, retries=0) as client:  # what does load still serves
            assert client.classify([IMAGE], model="good")
    assert any("NOT ready" in r.getMessage() and "broken" in r.getMessage() for r in caplog.records)


def test_readiness_follows_unload_and_load_requests(tmp_path):
    export_small(tmp_path, "a")
    export_small(tmp_path, "b")
    with running_server(tmp_path) as server:
        repository = tg.InferenceServerClient(server.address)
        assert readiness(server.address) == (SERVING, True, True)
        repository.unload_model("a")  # the other model still serves all there is to serve
        assert readiness(server.address) == (SERVING, True, True)
        repository.unload_model("b")  # nothing left to serve
        assert readiness(server.address) == (NOT_SERVING, False, False)
        repository.load_model("a")
        assert readiness(server.address) == (SERVING, True, True)


# -- 2. management under mutual TLS --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_of(pki, who: str) -> Tls:
    return Tls.from_files(ca=pki.ca, cert=getattr(pki, f"{who}_cert"), key=getattr(pki, f"{who}_key"))


def unload(address: str, tls: Tls, name: str = "fmnist") -> grpc.StatusCode:
    credentials = grpc.ssl_channel_credentials(tls.ca, tls.key, tls.cert)
    with grpc.secure_channel(address, credentials) as channel:
        try:
            pb_grpc.GRPCInferenceServiceStub(channel).RepositoryModelUnload(
                pb.RepositoryModelUnloadRequest(model_name=name), timeout=10)
            return grpc.StatusCode.OK
        except grpc.RpcError as e:
            return e.code()


def test_mutual_tls_without_tokens_refuses_management_to_every_certificate(tmp_path, pki):
    export_small(tmp_path, "fmnist")
    files = TlsFiles(str(pki.server_cert), str(pki.server_key), str(pki.ca))
    with running_server(tmp_path, tls=files) as server:
        address = f"localhost:{server.port}"
        with ClassifierClient(address, tls=tls_of(pki, "client"), retries=0) as client:
            assert client.classify([IMAGE])  # a certificate alone is enough to infer
        assert unload(address, tls_of(pki, "client")) == grpc.StatusCode.PERMISSION_DENIED
        assert unload(address, tls_of(pki, "operator")) == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("identity", ["operator", "ops.example.test"])  # the common name, or an alternative name
def test_mutual_tls_admin_identities_may_manage_and_others_may_not(tmp_path, pki, identity):
    export_small(tmp_path, "fmnist")
    files = TlsFiles(str(pki.server_cert), str(pki.server_key), str(pki.ca))
    with running_server(tmp_path, tls=files, admin_identities=(identity,)) as server:
        address = f"localhost:{server.port}"
        assert unload(address, tls_of(pki, "client")) == grpc.StatusCode.PERMISSION_DENIED
        assert unload(address, tls_of(pki, "operator")) == grpc.StatusCode.OK


# -- 3. bounded connections --------------------------------------------------------------------------------------
def closed_by_peer(sock: socket.socket, within_s: float) -> bool:
    """True when the server closes the connection within the time (a GOAWAY first is fine)."""
    sock.settimeout(within_s)
    end = time.monotonic() + within_s
    try:
        while time.monotonic() < end:
            if not sock.recv(65536):
                return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return False


def test_idle_and_silent_connections_are_closed_and_callers_keep_being_served(small_repo):
    limits = ConnectionLimits(idle_s=1.0, handshake_timeout_s=1.0)
    with running_server(small_repo, connections=limits) as server:
        silent = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(50)]
        idle = [RawHttp2(server.port) for _ in range(200)]  # preface and SETTINGS, then nothing
        with ClassifierClient(server.address, retries=0) as client:
            assert client.classify([IMAGE])
        assert all(closed_by_peer(s, 5.0) for s in silent)
        assert all(closed_by_peer(c.sock, 5.0) for c in idle)
        with ClassifierClient(server.address, retries=0) as client:
            assert client.classify([IMAGE])
        for s in silent:
            s.close()
        for c in idle:
            c.close()


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def test_the_connection_cap_holds_and_is_logged(small_repo):
    server = ServerProcess(str(small_repo), "--max-connections", "64")
    sockets = []
    try:
        baseline = open_fds(server.proc.pid)
        with grpc.insecure_channel(server.address) as channel:  # a caller connected before the flood
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            stub.ServerLive(pb.ServerLiveRequest(), timeout=5)
            for _ in range(300):
                sockets.append(socket.create_connection(("127.0.0.1", int(server.address.rsplit(":", 1)[1]))))
            time.sleep(2.5)
            assert open_fds(server.proc.pid) - baseline <= 64 + 8
            assert stub.ServerLive(pb.ServerLiveRequest(), metadata=[("authorization", f"Bearer {TOKEN}")],
                                   timeout=5).live
    finally:
        for s in sockets:
            s.close()
        log = server.stop()
    assert "connection cap reached" in log


def test_a_reset_flood_leaves_other_callers_served(small_repo):
    """One connection opening and resetting streams as fast as it can (from a process of its own), while a
    caller classifies on another connection: every call is answered."""
    with running_server(small_repo) as server:
        sent, (answered, failed, median_ms) = reset_flood(server.address, seconds=3.0)
    print(f"\n{sent} streams opened and reset; {answered} calls answered meanwhile, median {median_ms:.1f} ms")
    assert sent > 1000 and answered >= 20 and failed == 0


# -- 6. metrics port, IPv6, audit line, streams counted ------------------------------------------------------------
def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""


def test_the_metrics_port_serves_metrics_only_and_idle_connections_cost_no_thread(small_repo):
    port = free_port()
    with running_server(small_repo, metrics_port=port) as server:
        threads = threading.active_count()
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(100)]
        status, text = get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200 and "grpc_requests_total" in text
        assert threading.active_count() <= threads + 2
        assert get(f"http://127.0.0.1:{port}/")[0] == 404
        assert get(f"http://127.0.0.1:{port}/anything")[0] == 404
        for s in idle:
            s.close()
        del server


def test_ipv6_loopback_serves_grpc_and_metrics(small_repo):
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    port = free_port()
    with running_server(small_repo, host="::1", metrics_port=port, metrics_host="::1") as server:
        with ClassifierClient(f"[::1]:{server.port}", retries=0) as client:
            assert client.classify([IMAGE])
        assert get(f"http://[::1]:{port}/metrics")[0] == 200
    port = free_port()  # "[::]" and "::": every address, IPv4 included (only loopback is called here)
    with running_server(small_repo, host="[::]", metrics_port=port, metrics_host="::",
                        allow_unauthenticated=True) as server:
        for host in ("127.0.0.1", "[::1]"):
            with ClassifierClient(f"{host}:{server.port}", retries=0) as client:
                assert client.classify([IMAGE])
            assert get(f"http://{host}:{port}/metrics")[0] == 200


def test_refused_calls_are_audited_at_a_bounded_rate_and_streams_are_counted(small_repo, caplog):
    port = free_port()
    with running_server(small_repo, inference_tokens=(TOKEN,), metrics_port=port) as server:
        stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.address))
        burst = [stub.ServerMetadata.future(pb.ServerMetadataRequest()) for _ in range(200)]  # at once
        assert all(f.exception().code() == grpc.StatusCode.UNAUTHENTICATED for f in burst)
        time.sleep(0.2)  # past the rate limit: the next refusal is logged, with the count of those left out
        with pytest.raises(grpc.RpcError):
            stub.ServerMetadata(pb.ServerMetadataRequest())
        with ClassifierClient(server.address, token=TOKEN, retries=0) as client:
            assert len(list(client.classify_stream([(str(i), [IMAGE]) for i in range(3)]))) == 3
        time.sleep(0.1)
        text = get(f"http://127.0.0.1:{port}/metrics")[1]
    audit = [r.getMessage() for r in caplog.records if r.name == "serving.audit"]
    assert audit and len(audit) < 50, len(audit)  # rate-limited
    assert "ServerMetadata" in audit[0] and "127.0.0.1" in audit[0] and "requires a token" in audit[0]
    left_out = sum(int(re.search(r"\+(\d+) refused", line)[1]) for line in audit if "not logged" in line)
    assert left_out and len(audit) + left_out == 201
    assert value(text, "grpc_requests_total", method="ServerMetadata", code="UNAUTHENTICATED") == 201
    assert value(text, "grpc_requests_total", method="ClassifyStream", code="OK") == 1


def test_the_metrics_port_binds_loopback_unless_told(small_repo):
    port = free_port()
    with running_server(small_repo, metrics_port=port):
        listening = [c for c in _listening_sockets() if c[1] == port]
    assert listening and all(host in ("127.0.0.1",) for host, _ in listening), listening


def _listening_sockets() -> list[tuple[str, int]]:
    """(address, port) of every listening TCP socket on this machine, from /proc/net/tcp."""
    out = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        if state == "0A":  # LISTEN
            host_hex, port_hex = local.split(":")
            host = socket.inet_ntoa(bytes.fromhex(host_hex)[::-1])
            out.append((host, int(port_hex, 16)))
    return out



def test_a_bug_in_any_rpc_is_internal_with_no_internals_and_its_traceback_logged(small_repo, monkeypatch, caplog):
    """ServerMetadata maps no errors of its own: the gate gives every RPC the same mapping."""
    from serving.server.api.kserve import service

    def broken() -> str:
        raise RuntimeError("/secret/path/in/the/message")

    monkeypatch.setattr(service, "_server_version", broken)
    with running_server(small_repo) as server:
        stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.address))
        with pytest.raises(grpc.RpcError) as e:
            stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=10)
    assert e.value.code() == grpc.StatusCode.INTERNAL and "/secret" not in e.value.details()
    assert any(r.exc_info and "/secret/path" in str(r.exc_info[1]) for r in caplog.records)
