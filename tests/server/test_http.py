"""The KServe v2 REST port, driven through clients nobody here wrote (tritonclient.http, KServe's
InferenceRESTClient) and through raw HTTP for what no client sends (hostile bodies), against the real server
on free localhost ports. Answers are compared with the same server's gRPC answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from serving.server.http.gate import HTTP_STATUS
from tests.conftest import LABELS, RunningServer, running_server
from tests.server.test_security import ADMIN_TOKEN, INFERENCE_TOKEN

th = pytest.importorskip("tritonclient.http")
tg = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

MODEL = "fmnist"  # what tests/conftest.py exports
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "images" / "bag.png"


@pytest.fixture(scope="module")
def rest_server(small_repo) -> Iterator[RunningServer]:
    with running_server(small_repo, http_port=0, http_body_timeout_s=1.0) as s:
        s.http = f"127.0.0.1:{s.server.http_port}"
        yield s


@pytest.fixture(scope="module")
def token_rest_server(small_repo) -> Iterator[RunningServer]:
    with running_server(small_repo, http_port=0, inference_tokens=(INFERENCE_TOKEN,),
                        admin_tokens=(ADMIN_TOKEN,)) as s:
        s.http = f"127.0.0.1:{s.server.http_port}"
        yield s


def rest(address: str, method: str, path: str, body: bytes | dict | None = None,
         headers: dict | None = None) -> tuple[int, dict, bytes]:
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, 28, 28), dtype=np.float32)


def grpc_logits(server: RunningServer, x: np.ndarray) -> np.ndarray:
    c = tg.InferenceServerClient(server.address)
    i = tg.InferInput("input", list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    return c.infer(MODEL, [i]).as_numpy("logits")


# -- tritonclient.http -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_http_infer_matches_grpc(rest_server, binary):
    client = th.InferenceServerClient(rest_server.http)
    x = pixels(3, seed=int(binary))
    i = th.InferInput("input", list(x.shape), "FP32")
    i.set_data_from_numpy(x, binary_data=binary)
    outputs = [th.InferRequestedOutput("logits", binary_data=binary),
               th.InferRequestedOutput("probabilities", binary_data=binary, class_count=3),
               th.InferRequestedOutput("cam", binary_data=binary)]
    result = client.infer(MODEL, [i], outputs=outputs, request_id="r-7")
    logits = result.as_numpy("logits")
    np.testing.assert_allclose(logits, grpc_logits(rest_server, x), rtol=1e-5, atol=1e-6)
    top = result.as_numpy("probabilities")
    assert top.shape == (3, 3)
    best = logits.argmax(axis=1)
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    for row, k, p in zip(top, best, probabilities):
        text = row[0].decode() if isinstance(row[0], bytes) else row[0]  # JSON BYTES come back as str
        score, index, label = text.split(":")
        assert int(index) == k and label == LABELS[k] and float(score) == pytest.approx(p[k], abs=1e-5)
    cam = result.as_numpy("cam")
    assert cam.shape == (3, 28, 28) and 0 <= cam.min() and cam.max() <= 1
    assert result.get_output("cam")["parameters"]["cam_class"] == ",".join(map(str, best))
    assert result.get_response()["id"] == "r-7"


def test_tritonclient_http_bytes_images_uint8_and_fp16(rest_server):
    client = th.InferenceServerClient(rest_server.http)
    png = EXAMPLE.read_bytes()
    i = th.InferInput("input", [2], "BYTES")
    i.set_data_from_numpy(np.array([png, png], dtype=object), binary_data=True)
    top = client.infer(MODEL, [i], outputs=[th.InferRequestedOutput("logits", class_count=1)]).as_numpy("logits")
    assert top.shape == (2, 1) and top[0, 0] == top[1, 0]
    u8 = (pixels(2, seed=4) * 255).astype(np.uint8)
    for array, datatype, binary in ((u8, "UINT8", False), (u8, "UINT8", True), (pixels(2, seed=5).astype(np.float16),
                                                                                 "FP16", True)):
        i = th.InferInput("input", list(array.shape), datatype)
        i.set_data_from_numpy(array, binary_data=binary)
        got = client.infer(MODEL, [i]).as_numpy("logits")
        want = array.astype(np.float32) / (255 if datatype == "UINT8" else 1)
        np.testing.assert_allclose(got, grpc_logits(rest_server, want), rtol=1e-3, atol=1e-3)


def test_tritonclient_http_every_other_call(rest_server):
    client = th.InferenceServerClient(rest_server.http)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    assert client.is_model_ready(MODEL, "1") and not client.is_model_ready("nope")
    meta = client.get_server_metadata()
    assert "binary_tensor_data" in meta["extensions"] and "classification" in meta["extensions"]
    model = client.get_model_metadata(MODEL)
    assert model["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    assert [o["name"] for o in model["outputs"]] == ["logits", "features", "probabilities", "cam"]
    config = client.get_model_config(MODEL, "1")
    assert config["name"] == MODEL and isinstance(config["max_batch_size"], int) and config["max_batch_size"] > 0
    assert config["input"][0]["dims"] == [1, 28, 28] and config["input"][0]["data_type"] == "TYPE_FP32"
    stats = client.get_inference_statistics(MODEL)["model_stats"][0]
    assert stats["name"] == MODEL and isinstance(stats["inference_count"], int)
    assert isinstance(stats["inference_stats"]["success"]["ns"], int)
    index = client.get_model_repository_index()
    assert {"name": MODEL, "version": "1", "state": "READY", "reason": ""} in index
    with pytest.raises(InferenceServerException) as refused:
        client.get_model_metadata("nope")
    assert refused.value.status() == "404" and "nope" in refused.value.message()


def test_errors_have_the_http_status_of_their_grpc_code(rest_server):
    x = {"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 27], "data": [0.5] * 756}
    status, headers, body = rest(rest_server.http, "POST", f"/v2/models/{MODEL}/infer", {"inputs": [x]})
    assert status == 400 and headers["content-type"].startswith("application/json")
    assert "shape [1, 1, 28, 27]" in json.loads(body)["error"]
    assert rest(rest_server.http, "POST", "/v2/models/nope/infer", {"inputs": [x]})[0] == 404
    status, _, body = rest(rest_server.http, "GET", f"/v2/models/{MODEL}/versions/x1")
    assert status == 400 and "non-negative integer" in json.loads(body)["error"]
    # a KServe timeout parameter reaches the batcher as on gRPC: 504 for the deadline
    assert HTTP_STATUS[grpc.StatusCode.DEADLINE_EXCEEDED] == 504
    assert rest(rest_server.http, "GET", "/v2/nothing")[0] == 404


def test_json_tensors_nested_flat_and_every_json_datatype_is_checked(rest_server):
    x = (pixels(1, seed=9) * 255).astype(np.uint8)
    for data in (x.tolist(), x.ravel().tolist()):
        body = {"inputs": [{"name": "input", "datatype": "UINT8", "shape": [1, 1, 28, 28], "data": data}],
                "outputs": [{"name": "logits"}]}
        status, _, answer = rest(rest_server.http, "POST", f"/v2/models/{MODEL}/infer", body)
        assert status == 200
        logits = np.array(json.loads(answer)["outputs"][0]["data"], np.float32).reshape(1, 10)
        np.testing.assert_allclose(logits, grpc_logits(rest_server, x.astype(np.float32) / 255), rtol=1e-4, atol=1e-5)
    bad = [([300] + [0] * 783, "UINT8", "outside the UINT8 range"), ([0.5] * 784, "UINT8", "must be integers"),
           (["a"] * 784, "FP32", "only numbers"), ([0] * 5, "FP32", "holds 5 values"),
           ([[0] * 28] * 27 + [[0] * 27], "FP32", "not a regular array"), ([0] * 784, "INT32", "INT32")]
    for data, datatype, message in bad:
        body = {"inputs": [{"name": "input", "datatype": datatype, "shape": [1, 1, 28, 28], "data": data}]}
        status, _, answer = rest(rest_server.http, "POST", f"/v2/models/{MODEL}/infer", body)
        assert status == 400 and message in json.loads(answer)["error"], (datatype, answer)


# -- KServe's client ---------------------------------------------------------------------------------------------

KSERVE_CLIENT = """
import asyncio, json, sys
import numpy as np
import kserve
from kserve.protocol.infer_type import RequestedOutput

async def main(base, model, x):
    client = kserve.InferenceRESTClient(kserve.RESTConfig(protocol="v2"))
    try:
        assert await client.is_server_live(base) and await client.is_server_ready(base)
        assert await client.is_model_ready(base, model)
        answers = []
        for binary in (True, False):
            inp = kserve.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=binary)
            outputs = [RequestedOutput("logits", parameters={"binary_data": binary})]
            request = kserve.InferRequest(model_name=model, infer_inputs=[inp], request_outputs=outputs)
            result = await client.infer(base, request, model_name=model)
            answers.append(np.asarray(result.outputs[0].as_numpy(), np.float32).reshape(-1).tolist())
        return answers
    finally:
        await client.close()

x = np.asarray(json.loads(sys.argv[3]), np.float32)
print(json.dumps(asyncio.run(main(sys.argv[1], sys.argv[2], x))))
"""


def test_kserve_rest_client(rest_server):
    """KServe's own REST client, binary and JSON (in its own process: kserve's generated messages and
    tritonclient's share the `inference` package name, and one process cannot hold both)."""
    import importlib.util
    import subprocess
    import sys
    if importlib.util.find_spec("kserve") is None:
        pytest.skip("kserve is not installed (the [dev] extra brings it)")
    x = pixels(2, seed=3)
    done = subprocess.run([sys.executable, "-c", KSERVE_CLIENT, f"http://{rest_server.http}", MODEL,
                           json.dumps(x.tolist())], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    binary, plain = json.loads(done.stdout.strip().splitlines()[-1])
    want = grpc_logits(rest_server, x).reshape(-1)
    np.testing.assert_allclose(binary, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(plain, want, rtol=1e-5, atol=1e-6)


# -- tokens, roles, metrics ----------------------------------------------------------------------------------------

def test_tokens_and_roles_as_on_grpc(token_rest_server):
    address = token_rest_server.http
    bearer = lambda token: {"Authorization": f"Bearer {token}"}  # noqa: E731
    assert rest(address, "GET", "/v2/health/ready")[0] == 200  # probes need no token, as grpc.health.v1
    status, headers, body = rest(address, "GET", f"/v2/models/{MODEL}")
    assert status == 401 and headers["www-authenticate"].startswith("Bearer") and "token" in json.loads(body)["error"]
    assert rest(address, "GET", f"/v2/models/{MODEL}", headers=bearer("x" * 20))[0] == 401
    assert rest(address, "GET", f"/v2/models/{MODEL}", headers=bearer(INFERENCE_TOKEN))[0] == 200
    status, _, body = rest(address, "POST", f"/v2/repository/models/{MODEL}/load", headers=bearer(INFERENCE_TOKEN))
    assert status == 403 and "management" in json.loads(body)["error"]
    assert rest(address, "POST", f"/v2/repository/models/{MODEL}/load", headers=bearer(ADMIN_TOKEN))[0] == 200
    client = th.InferenceServerClient(address)
    assert client.get_model_metadata(MODEL, headers=bearer(INFERENCE_TOKEN))["name"] == MODEL
    registry = token_rest_server.server.metrics.registry
    assert registry.get_sample_value("http_requests_total", {"method": "ModelMetadata", "status": "401"}) == 2
    assert registry.get_sample_value("http_requests_total", {"method": "RepositoryModelLoad", "status": "403"}) == 1


def test_a_refused_call_body_is_never_read(token_rest_server):
    """No token: 401 from the headers alone, before the client has sent its (announced) 60 MB."""
    host, port = token_rest_server.http.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {60 << 20}\r\n\r\n".encode())
        assert s.recv(4096).startswith(b"HTTP/1.1 401")


# -- hostile bodies ------------------------------------------------------------------------------------------------

def raw(address: str, data: bytes, wait_s: float = 5.0) -> bytes:
    host, port = address.split(":")
    with socket.create_connection((host, int(port)), timeout=wait_s) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
                if b"\r\n\r\n" in out and b'"error"' in out:
                    break
        except TimeoutError:
            pass
        return out


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.") else 0


def test_hostile_bodies_get_4xx(rest_server):
    a, path = rest_server.http, f"/v2/models/{MODEL}/infer"
    limit = rest_server.options.max_message_bytes
    head = lambda length, extra="": (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n"  # noqa: E731
                                     f"{extra}\r\n").encode()
    assert _status(raw(a, head(limit + 1))) == 413                                 # announced too big
    assert _status(raw(a, head(100) + b"{}")) == 408                               # promises more than it sends
    assert _status(raw(a, head("12x"))) == 400                                     # Content-Length not a number
    assert _status(raw(a, head(5, "Transfer-Encoding: chunked\r\n") + b"0\r\n\r\n")) == 400  # both: smuggling
    deep = b"[" * 5000 + b"]" * 5000
    status, _, body = rest(a, "POST", path, deep)
    assert status == 400 and "JSON" in json.loads(body)["error"]
    header = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28],
                                     "parameters": {"binary_data_size": 784 * 4}}]}).encode()
    for extra, header_length, message in ((b"\0" * 100, len(header), "runs past"),
                                          (b"\0" * (784 * 4 + 8), len(header), "follow the inputs"),
                                          (b"\0" * 3136, len(header) + 10 ** 6, "Inference-Header-Content-Length"),
                                          (b"\0" * 3136, "-1", "Inference-Header-Content-Length")):
        status, _, body = rest(a, "POST", path, header + extra, {"Inference-Header-Content-Length": str(header_length)})
        assert status == 400 and message in json.loads(body)["error"], body
    bytes_header = json.dumps({"inputs": [{"name": "input", "datatype": "BYTES", "shape": [1],
                                           "parameters": {"binary_data_size": 8}}]}).encode()
    status, _, body = rest(a, "POST", path, bytes_header + struct.pack("<I", 10 ** 9) + b"abcd",
                           {"Inference-Header-Content-Length": str(len(bytes_header))})
    assert status == 400 and "claims" in json.loads(body)["error"]
    huge = b'{"inputs": [' + b"0," * (9 << 20) + b"0]}"
    status, _, body = rest(a, "POST", path, huge)
    assert status == 400 and "binary data" in json.loads(body)["error"]
    for body in (b"[]", b'{"inputs": 3}', b'{"inputs": [{"name": "input"}]}', b"\xff\xfe"):
        assert rest(a, "POST", path, body)[0] == 400, body
    assert rest(a, "POST", "/v2/repository/index", b'{"ready": "yes"}')[0] == 400
    assert rest(a, "GET", f"/v2/models/{'m' * 5000}")[0] in (400, 404)


def test_memory_stays_bounded_under_many_large_bodies(rest_server):
    """40 callers announce 60 MB bodies (2.4 GB) and send 8 MB of each: the bodies read at once stay within the
    gate's budget (4 limits); the others are answered 429 before a byte of theirs is read."""
    import resource
    a = rest_server.http
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    chunk = b"\0" * (1 << 20)
    statuses = []

    def send():
        host, port = a.split(":")
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {60 << 20}\r\n"
                      "\r\n".encode())
            try:
                for _ in range(8):
                    s.sendall(chunk)
            except OSError:
                pass  # the server answered and closed
            with contextlib.suppress(OSError):
                statuses.append(_status(s.recv(100)))

    threads = [threading.Thread(target=send) for _ in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert set(statuses) == {408, 429} and statuses.count(429) >= len(statuses) // 2, statuses
    assert grown_mb < 4 * 64 + 100, grown_mb
    assert rest(a, "GET", "/v2/health/ready")[0] == 200


def test_junk_after_a_malformed_request_is_not_held(rest_server):
    """40 connections each send a request aiohttp cannot parse, then 8 MB more: each gets its 400 and is closed,
    and the server holds none of what followed (aiohttp alone would hold up to 8 MB of it per connection)."""
    import psutil
    a = rest_server.http
    me, peak, watching = psutil.Process(), [0], threading.Event()
    start_rss = me.memory_info().rss

    def watch():
        while not watching.is_set():
            peak[0] = max(peak[0], me.memory_info().rss)
            time.sleep(0.01)

    def send(statuses):
        host, port = a.split(":")
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n".encode())
            with contextlib.suppress(OSError):  # the server answered and closed
                for _ in range(32):
                    s.sendall(b"j" * (256 << 10))
            with contextlib.suppress(OSError):
                statuses.append(_status(s.recv(100)))

    watcher, statuses = threading.Thread(target=watch), []
    watcher.start()
    threads = [threading.Thread(target=send, args=(statuses,)) for _ in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    watching.set()
    watcher.join()
    grown_mb = (peak[0] - start_rss) / 2**20
    assert statuses and set(statuses) == {400}, statuses
    assert grown_mb < 64, f"{grown_mb:.0f} MB held for 320 MB of junk"
    assert rest(a, "GET", "/v2/health/ready")[0] == 200


# -- drain ---------------------------------------------------------------------------------------------------------

def test_drain_answers_what_it_accepted_and_refuses_the_rest(small_repo):
    with running_server(small_repo, http_port=0, http_body_timeout_s=10.0) as s:
        address = f"127.0.0.1:{s.server.http_port}"
        x = pixels(1)
        header = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28],
                                         "parameters": {"binary_data_size": x.nbytes}}]}).encode()
        body = header + x.tobytes()
        host, port = address.split(":")
        accepted = socket.create_connection((host, int(port)), timeout=15)
        accepted.sendall(f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
                         f"Inference-Header-Content-Length: {len(header)}\r\n\r\n".encode() + body[:10])
        deadline = time.monotonic() + 5
        while s.server.admission.in_flight == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        draining = asyncio.run_coroutine_threadsafe(s.server.drain(timeout_s=10), s.loop)
        deadline = time.monotonic() + 5
        while s.server.admission.accepting and time.monotonic() < deadline:
            time.sleep(0.01)
        status, headers, answer = rest(address, "POST", f"/v2/models/{MODEL}/infer", body,
                                       {"Inference-Header-Content-Length": str(len(header))})
        assert status == 503 and "shutting down" in json.loads(answer)["error"]
        assert headers.get("connection") == "close"
        assert rest(address, "GET", "/v2/health/ready")[0] == 400 and rest(address, "GET", "/v2/health/live")[0] == 200
        accepted.sendall(body[10:])
        reply = b""
        while b"outputs" not in reply:
            reply += accepted.recv(65536)
        accepted.close()
        assert reply.startswith(b"HTTP/1.1 200")
        assert draining.result(15) is True


# -- the OpenAPI document -------------------------------------------------------------------------------------------

def test_openapi_document_names_every_route(rest_server):
    status, _, body = rest(rest_server.http, "GET", "/v2/openapi.json")
    assert status == 200
    spec = json.loads(body)
    schemathesis = pytest.importorskip("schemathesis")
    operations = [op.ok() for op in schemathesis.openapi.from_dict(spec).get_all_operations()]  # a valid document
    assert len(operations) == sum(len([m for m in item if m != "parameters"]) for item in spec["paths"].values())
    served = {r.resource.canonical for r in rest_server.server.http.app.router.routes()
              if r.resource is not None and r.resource.canonical.startswith("/v2/") and r.method != "HEAD"}
    served.add("/v2")
    documented = set(spec["paths"]) | {"/v2/openapi.json"}
    assert served == documented
    for path, item in spec["paths"].items():
        methods = {m.upper() for m in item if m != "parameters"}
        routed = {r.method for r in rest_server.server.http.app.router.routes()
                  if r.resource is not None and r.resource.canonical == path and r.method != "HEAD"}
        assert methods == routed, path


def test_schemathesis_from_the_served_document(small_repo, tmp_path):
    """Schemathesis generates requests from /v2/openapi.json against a live server (bounded in time): no answer
    is a 500, and every answer has a documented status, content type and schema. Load and unload are left out
    (they would unload the model under the other generated calls; the token tests cover them)."""
    import shutil
    import subprocess
    import sys
    cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    if cli is None:
        pytest.skip("schemathesis is not installed (the [dev] extra brings it)")
    with running_server(small_repo, http_port=0, http_body_timeout_s=2.0) as s:
        done = subprocess.run(
            [cli, "--no-color", "run", f"http://127.0.0.1:{s.server.http_port}/v2/openapi.json",
             "--checks", "status_code_conformance,content_type_conformance,response_schema_conformance",
             "--max-examples", "30", "--max-time", "40", "--seed", "7", "--workers", "1", "--request-timeout", "10",
             "--exclude-path-regex", "/(load|unload)$", "--report-dir", str(tmp_path)],
            capture_output=True, text=True, timeout=240, cwd=tmp_path)  # its cache goes to tmp_path/.schemathesis
        assert done.returncode == 0, done.stdout[-4000:]
        statuses = s.server.metrics.registry
        served_500 = sum(v for m in statuses.collect() if m.name == "http_requests"
                         for sample in m.samples if sample.name == "http_requests_total"
                         and sample.labels["status"] == "500" for v in [sample.value])
        assert served_500 == 0


def test_https_with_the_grpc_ports_files_and_client_certificates(small_repo, tmp_path):
    """The REST port is HTTPS with the server's TLS files; under mutual TLS a client without a certificate of
    the CA is refused by the handshake, and an admin identity may manage over REST as over gRPC."""
    import ssl

    from serving.server.access import TlsFiles
    from tests.pki import make_pki
    pki = make_pki(tmp_path / "pki")
    tls = TlsFiles(str(pki.server_cert), str(pki.server_key), str(pki.ca))
    with running_server(small_repo, http_port=0, tls=tls, admin_identities=("operator",)) as s:
        port = s.server.http_port

        def call(method: str, path: str, cert=None) -> int:
            context = ssl.create_default_context(cafile=str(pki.ca))
            if cert:
                context.load_cert_chain(*cert)
            conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
            try:
                conn.request(method, path)
                return conn.getresponse().status
            finally:
                conn.close()

        client, operator = (pki.client_cert, pki.client_key), (pki.operator_cert, pki.operator_key)
        assert call("GET", f"/v2/models/{MODEL}", client) == 200
        assert call("POST", f"/v2/repository/models/{MODEL}/load", client) == 403
        assert call("POST", f"/v2/repository/models/{MODEL}/load", operator) == 200
        with pytest.raises((ssl.SSLError, ConnectionError)):
            call("GET", "/v2/health/ready")  # no client certificate
        with pytest.raises((ssl.SSLError, ConnectionError)):
            call("GET", "/v2/health/ready", (pki.stranger_cert, pki.stranger_key))


def test_slow_headers_and_idle_connections_are_closed(small_repo, monkeypatch):
    """A client that never finishes its headers (slowloris), or keeps a connection idle, is closed after the
    site's idle timeout."""
    from serving.server.http import site
    monkeypatch.setattr(site, "IDLE_TIMEOUT_S", 1.0)
    with running_server(small_repo, http_port=0) as s:
        port = s.server.http_port
        with socket.create_connection(("127.0.0.1", port), timeout=10) as slow, \
                socket.create_connection(("127.0.0.1", port), timeout=10) as idle:
            slow.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
            started = time.monotonic()
            assert slow.recv(100) == b"" and idle.recv(100) == b""  # closed by the server
            assert time.monotonic() - started < 5
