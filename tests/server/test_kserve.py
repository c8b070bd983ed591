"""The KServe v2 / Triton gRPC front end, driven only through Triton's own clients (sync, asyncio, streams)
against the real server over a repository written by the real exporter.

`server` and `small_repo` come from tests/conftest.py and are shared with the classifier.v1 tests: every
test here leaves the model loaded as it found it. The hot-swap test makes its own repository and server.
"""

from __future__ import annotations

import asyncio
import io
import queue
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

tg = pytest.importorskip("tritonclient.grpc")
import tritonclient.grpc.aio as tg_aio  # noqa: E402
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from serving.repository_format import read_config  # noqa: E402
from tests.conftest import LABELS, RunningServer, export_small, running_server  # noqa: E402

MODEL = "fmnist"  # what tests/conftest.py exports


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[tg.InferenceServerClient]:
    c = tg.InferenceServerClient(server.address)
    yield c
    c.close()


@pytest.fixture(scope="module")
def stub(server: RunningServer) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    """Triton's generated stub, for requests its InferenceServerClient cannot build (typed contents)."""
    with grpc.insecure_channel(server.address) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def reference(small_repo: Path) -> ort.InferenceSession:
    """onnxruntime on the served file itself: what every input encoding must agree with."""
    return ort.InferenceSession(str(small_repo / MODEL / "1" / "model.onnx"), providers=["CPUExecutionProvider"])


def pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 1, 28, 28), dtype=np.uint8)


def infer_input(name: str, array: np.ndarray, datatype: str) -> tg.InferInput:
    i = tg.InferInput(name, list(array.shape), datatype)
    i.set_data_from_numpy(array)
    return i


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def status(e: pytest.ExceptionInfo) -> str:
    return str(e.value.status())


# -- health, metadata, configuration -----------------------------------------------------------------------------
def test_health_and_metadata(client: tg.InferenceServerClient, small_repo: Path) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "1")
    assert not client.is_model_ready("no_such_model") and not client.is_model_ready(MODEL, "7")
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "cnn-serving" and {"classification", "model_repository", "statistics"} <= set(
        meta["extensions"])
    model = client.get_model_metadata(MODEL)
    assert model.name == MODEL and list(model.versions) == ["1"] and model.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [("input", "FP32", [-1, 1, 28, 28])]
    assert {t.name: list(t.shape) for t in model.outputs} == {
        "logits": [-1, 10], "features": [-1, 64, 7, 7], "probabilities": [-1, 10], "cam": [-1, 28, 28]}
    config = client.get_model_config(MODEL).config  # decoded by Triton's own ModelConfig schema
    assert config.name == MODEL and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == read_config(small_repo / MODEL).max_batch_size > 0
    assert list(config.input[0].dims) == [1, 28, 28] and config.output[0].label_filename == "labels.txt"
    assert config.parameters["architecture"].string_value == "small_fmnist"
    assert config.parameters["accepted_input_datatypes"].string_value == "FP32,FP16,UINT8,BYTES"
    # One set of tensors in both answers (perf_analyzer requires it); the file on disk keeps the model's own.
    served = {(o.name, tuple(o.dims)) for o in config.output}
    assert served == {(t.name, tuple(t.shape[1:])) for t in model.outputs}
    assert {(i.name, tuple(i.dims)) for i in config.input} == {(t.name, tuple(t.shape[1:])) for t in model.inputs}
    assert [o.name for o in read_config(small_repo / MODEL).output] == ["logits", "features"]
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("no_such_model")
    assert status(e) == "StatusCode.NOT_FOUND" and "no_such_model" in e.value.message()


# -- inference ---------------------------------------------------------------------------------------------------
def test_fp32_raw_matches_onnxruntime(client: tg.InferenceServerClient, reference: ort.InferenceSession) -> None:
    x = pixels(3).astype(np.float32) / 255
    outputs = [tg.InferRequestedOutput("logits"), tg.InferRequestedOutput("probabilities")]
    result = client.infer(MODEL, [infer_input("input", x, "FP32")], outputs=outputs, request_id="r-1")
    want = reference.run(["logits"], {"input": x})[0]
    np.testing.assert_allclose(result.as_numpy("logits"), want, atol=1e-5)
    np.testing.assert_allclose(result.as_numpy("probabilities"), softmax(want), atol=1e-6)
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == (MODEL, "1", "r-1")
    # No outputs requested: the logits.
    default = client.infer(MODEL, [infer_input("input", x, "FP32")])
    assert [o.name for o in default.get_response().outputs] == ["logits"]


def test_uint8_fp16_and_png_inputs_agree(client: tg.InferenceServerClient, reference: ort.InferenceSession) -> None:
    u8 = pixels(2, seed=1)
    want = reference.run(["logits"], {"input": u8.astype(np.float32) / 255})[0]
    got_u8 = client.infer(MODEL, [infer_input("input", u8, "UINT8")]).as_numpy("logits")
    np.testing.assert_allclose(got_u8, want, atol=1e-5)
    images = np.array([png(img[0]) for img in u8], dtype=np.object_)  # one encoded image per element
    got_png = client.infer(MODEL, [infer_input("input", images, "BYTES")]).as_numpy("logits")
    np.testing.assert_allclose(got_png, want, atol=1e-5)
    x16 = (u8.astype(np.float32) / 255).astype(np.float16)
    got_16 = client.infer(MODEL, [infer_input("input", x16, "FP16")]).as_numpy("logits")
    np.testing.assert_allclose(got_16, reference.run(["logits"], {"input": x16.astype(np.float32)})[0], atol=1e-5)


def test_typed_contents(stub: service_pb2_grpc.GRPCInferenceServiceStub, reference: ort.InferenceSession) -> None:
    u8 = pixels(2, seed=2)
    want = reference.run(["logits"], {"input": u8.astype(np.float32) / 255})[0]

    def request(datatype: str, shape: list[int], **contents) -> service_pb2.ModelInferRequest:
        r = service_pb2.ModelInferRequest(model_name=MODEL)
        r.inputs.add(name="input", datatype=datatype, shape=shape, contents=service_pb2.InferTensorContents(**contents))
        return r

    cases = [request("FP32", [2, 1, 28, 28], fp32_contents=(u8.astype(np.float32) / 255).ravel().tolist()),
             request("UINT8", [2, 1, 28, 28], uint_contents=u8.ravel().tolist()),
             request("BYTES", [2], bytes_contents=[png(img[0]) for img in u8])]
    for r in cases:
        response = stub.ModelInfer(r, timeout=30)
        # Outputs come back raw whatever the inputs were: that is where Triton's clients read them.
        assert not response.outputs[0].contents.fp32_contents and len(response.raw_output_contents) == 1
        got = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(list(response.outputs[0].shape))
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=r.inputs[0].datatype)
    with pytest.raises(grpc.RpcError) as e:  # FP16 has no typed field: Triton's rule, said plainly
        stub.ModelInfer(request("FP16", [2, 1, 28, 28], fp32_contents=[0.0] * 2 * 784), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "raw_input_contents" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelInfer(request("UINT8", [1, 1, 28, 28], uint_contents=[300] * 784), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "outside 0..255" in e.value.details()


def test_classification_strings(client: tg.InferenceServerClient, reference: ort.InferenceSession) -> None:
    x = pixels(2, seed=3).astype(np.float32) / 255
    outputs = [tg.InferRequestedOutput("probabilities", class_count=3), tg.InferRequestedOutput("logits")]
    result = client.infer(MODEL, [infer_input("input", x, "FP32")], outputs=outputs)
    strings = result.as_numpy("probabilities")
    assert strings.shape == (2, 3) and result.get_output("probabilities").datatype == "BYTES"
    probs = softmax(reference.run(["logits"], {"input": x})[0])
    for row, p in zip(strings, probs, strict=True):
        parsed = [s.decode().split(":") for s in row]
        top = np.argsort(-p, kind="stable")[:3]
        assert [int(i) for _, i, _ in parsed] == top.tolist()
        assert [label for _, _, label in parsed] == [LABELS[i] for i in top]
        np.testing.assert_allclose([float(s) for s, _, _ in parsed], p[top], atol=1e-6)
    assert result.as_numpy("logits").shape == (2, 10)  # the other output stays a tensor
    # top-k of the logits: same order as the probabilities, scores the logits themselves
    result = client.infer(MODEL, [infer_input("input", x, "FP32")],
                          outputs=[tg.InferRequestedOutput("logits", class_count=2)])
    logits = reference.run(["logits"], {"input": x})[0]
    for row, z in zip(result.as_numpy("logits"), logits, strict=True):
        parsed = [s.decode().split(":") for s in row]
        assert [int(i) for _, i, _ in parsed] == np.argsort(-z, kind="stable")[:2].tolist()
        np.testing.assert_allclose([float(s) for s, _, _ in parsed], np.sort(z)[::-1][:2], atol=1e-5)


def test_cam_output(client: tg.InferenceServerClient, reference: ort.InferenceSession) -> None:
    x = pixels(2, seed=4).astype(np.float32) / 255
    inputs = [infer_input("input", x, "FP32")]
    result = client.infer(MODEL, inputs, outputs=[tg.InferRequestedOutput("cam"), tg.InferRequestedOutput("logits")])
    cam = result.as_numpy("cam")
    assert cam.shape == (2, 28, 28) and cam.dtype == np.float32 and 0 <= cam.min() and cam.max() <= 1
    predicted = reference.run(["logits"], {"input": x})[0].argmax(1)
    assert result.get_output("cam").parameters["cam_class"].string_param == ",".join(map(str, predicted))
    chosen = client.infer(MODEL, inputs, outputs=[tg.InferRequestedOutput("cam")], parameters={"cam_class": 3})
    assert chosen.get_output("cam").parameters["cam_class"].string_param == "3,3"
    with pytest.raises(InferenceServerException) as e:
        client.infer(MODEL, inputs, outputs=[tg.InferRequestedOutput("cam")], parameters={"cam_class": 10})
    assert status(e) == "StatusCode.INVALID_ARGUMENT" and "outside 0..9" in e.value.message()


def test_priority_timeout_and_deadline_are_accepted(client: tg.InferenceServerClient) -> None:
    x = [infer_input("input", pixels(1).astype(np.float32) / 255, "FP32")]
    assert client.infer(MODEL, x, priority=1, timeout=5_000_000, client_timeout=10).as_numpy("logits").shape == (1, 10)
    with pytest.raises(InferenceServerException) as e:  # one priority level configured
        client.infer(MODEL, x, priority=4)
    assert status(e) == "StatusCode.INVALID_ARGUMENT" and "priority 4" in e.value.message()


@pytest.mark.parametrize("case, code, words", [
    ("unknown_model", "NOT_FOUND", "is not in the repository"),
    ("unknown_version", "NOT_FOUND", "has no ready version 9"),
    ("wrong_shape", "INVALID_ARGUMENT", "has shape [2, 1, 27, 28], but model fmnist expects [-1, 1, 28, 28]"),
    ("wrong_dtype", "INVALID_ARGUMENT", "datatype 'INT32' is not supported"),
    ("wrong_name", "INVALID_ARGUMENT", "unexpected input 'image'"),
    ("unknown_output", "INVALID_ARGUMENT", "unknown output 'features2'"),
    ("bad_image", "INVALID_ARGUMENT", "cannot decode image"),
])
def test_errors(client: tg.InferenceServerClient, case: str, code: str, words: str) -> None:
    good = pixels(2).astype(np.float32) / 255
    model, version, outputs = MODEL, "", None
    inputs = [infer_input("input", good, "FP32")]
    if case == "unknown_model":
        model = "no_such_model"
    elif case == "unknown_version":
        version = "9"
    elif case == "wrong_shape":
        inputs = [infer_input("input", good[:, :, :27], "FP32")]
    elif case == "wrong_dtype":
        inputs = [infer_input("input", good.astype(np.int32), "INT32")]
    elif case == "wrong_name":
        inputs = [infer_input("image", good, "FP32")]
    elif case == "unknown_output":
        outputs = [tg.InferRequestedOutput("features2")]
    elif case == "bad_image":
        inputs = [infer_input("input", np.array([b"not an image"], dtype=np.object_), "BYTES")]
    with pytest.raises(InferenceServerException) as e:
        client.infer(model, inputs, model_version=version, outputs=outputs)
    assert status(e) == f"StatusCode.{code}" and words in e.value.message()


def test_unimplemented_extensions_say_so(client: tg.InferenceServerClient) -> None:
    for call in (client.get_system_shared_memory_status, client.get_cuda_shared_memory_status):
        with pytest.raises(InferenceServerException) as e:
            call()
        assert status(e) == "StatusCode.UNIMPLEMENTED" and "not supported by this server" in e.value.message()


# -- streaming and asyncio ---------------------------------------------------------------------------------------
def test_stream_answers_every_request_and_survives_errors(server: RunningServer) -> None:
    results: queue.Queue = queue.Queue()
    c = tg.InferenceServerClient(server.address)
    try:
        c.start_stream(callback=lambda result, error: results.put((result, error)))
        x = pixels(2, seed=5).astype(np.float32) / 255
        for i in range(4):
            inputs = [infer_input("input", x if i != 2 else x[:, :, :20], "FP32")]
            c.async_stream_infer(MODEL, inputs, request_id=f"s-{i}",
                                 outputs=[tg.InferRequestedOutput("logits"), tg.InferRequestedOutput("cam")])
        got = [results.get(timeout=30) for _ in range(4)]
        c.stop_stream()
    finally:
        c.close()
    ok = [r for r, err in got if err is None]
    errors = [err for _, err in got if err is not None]
    assert sorted(r.get_response().id for r in ok) == ["s-0", "s-1", "s-3"]
    assert all(r.as_numpy("logits").shape == (2, 10) and r.as_numpy("cam").shape == (2, 28, 28) for r in ok)
    assert len(errors) == 1 and "INVALID_ARGUMENT" in errors[0].message() and "[2, 1, 20, 28]" in errors[0].message()


def test_asyncio_client_and_stream(server: RunningServer) -> None:
    async def run() -> None:
        async with tg_aio.InferenceServerClient(server.address) as c:
            assert await c.is_model_ready(MODEL)
            x = pixels(4, seed=6).astype(np.float32) / 255
            inputs = [tg_aio.InferInput("input", list(x.shape), "FP32")]
            inputs[0].set_data_from_numpy(x)
            single = await c.infer(MODEL, inputs)
            many = await asyncio.gather(*(c.infer(MODEL, inputs) for _ in range(4)))  # batched together
            for r in many:
                np.testing.assert_allclose(r.as_numpy("logits"), single.as_numpy("logits"), atol=1e-5)

            async def requests():
                for i in range(3):
                    yield {"model_name": MODEL, "inputs": inputs, "request_id": f"a-{i}"}

            ids = []
            async for result, error in c.stream_infer(requests()):
                assert error is None
                ids.append(result.get_response().id)
                if len(ids) == 3:
                    break
            assert ids == ["a-0", "a-1", "a-2"]  # answered in arrival order

    asyncio.run(run())


def test_features_output_matches_onnxruntime(client: tg.InferenceServerClient, reference: ort.InferenceSession) -> None:
    x = pixels(3).astype(np.float32) / 255
    result = client.infer(MODEL, [infer_input("input", x, "FP32")],
                          outputs=[tg.InferRequestedOutput("features"), tg.InferRequestedOutput("logits")])
    logits, features = reference.run(["logits", "features"], {"input": x})
    np.testing.assert_allclose(result.as_numpy("features"), features, atol=1e-5)
    np.testing.assert_allclose(result.as_numpy("logits"), logits, atol=1e-5)


def test_non_finite_float_inputs_reach_the_model_as_in_triton(client: tg.InferenceServerClient,
                                                              reference: ort.InferenceSession) -> None:
    """perf_analyzer's random FP32 bytes hold NaN and infinities: they are served, and answer NaN for the
    images that hold them, while the other images of the request are answered as alone."""
    x = pixels(3).astype(np.float32) / 255
    x[0, 0, 0, 0], x[1, 0, 5, 5] = np.nan, np.inf
    for datatype in ("FP32", "FP16"):
        result = client.infer(MODEL, [infer_input("input", x.astype(datatype.lower().replace("fp", "float")),
                                                  datatype)],
                              outputs=[tg.InferRequestedOutput("probabilities"),
                                       tg.InferRequestedOutput("logits", class_count=2)])
        probabilities = result.as_numpy("probabilities")
        assert np.isnan(probabilities[:2]).all(1).all()
        np.testing.assert_allclose(probabilities[2], softmax(reference.run(["logits"], {"input": x[2:]})[0])[0],
                                   atol=1e-3 if datatype == "FP16" else 1e-5)
        assert result.as_numpy("logits")[0][0].decode().startswith("nan:")


def test_statistics_follow_tritons_semantics(server: RunningServer) -> None:
    """The invariants perf_analyzer checks: per-request counts equal across success, queue and the three
    compute phases; batch_stats counts add up to execution_count; the phases fit in the success time."""
    async def load() -> None:
        async with tg_aio.InferenceServerClient(server.address) as aio_client:
            requests = [aio_client.infer(MODEL, [infer_input("input", pixels(n, seed=n).astype(np.float32) / 255,
                                                             "FP32")]) for n in [1] * 24 + [2, 5, 9]]
            await asyncio.gather(*requests)

    asyncio.run(load())
    with tg.InferenceServerClient(server.address) as sync_client:
        (model,) = sync_client.get_inference_statistics(MODEL).model_stats
    s = model.inference_stats
    counts = {name: getattr(s, name).count for name in ("success", "queue", "compute_input", "compute_infer",
                                                         "compute_output")}
    assert len(set(counts.values())) == 1 and counts["success"] >= 27, counts
    assert s.queue.ns + s.compute_input.ns + s.compute_infer.ns + s.compute_output.ns <= s.success.ns
    assert s.compute_input.ns > 0 and s.compute_infer.ns > 0 and s.compute_output.ns > 0
    for phase in ("compute_input", "compute_infer", "compute_output"):
        assert sum(getattr(b, phase).count for b in model.batch_stats) == model.execution_count
    assert sum(b.batch_size * b.compute_infer.count for b in model.batch_stats) == model.inference_count


# -- statistics and repository control ---------------------------------------------------------------------------
def test_statistics_count_real_work(client: tg.InferenceServerClient) -> None:
    def stats():
        (s,) = client.get_inference_statistics(MODEL).model_stats
        return s

    before = stats()
    for n in (3, 5):
        client.infer(MODEL, [infer_input("input", pixels(n).astype(np.float32) / 255, "FP32")])
    after = stats()
    assert (after.name, after.version) == (MODEL, "1")
    assert after.inference_count - before.inference_count == 8
    assert after.execution_count - before.execution_count == 2
    s0, s1 = before.inference_stats, after.inference_stats
    assert s1.success.count - s0.success.count == 2 and s1.success.ns > s0.success.ns
    assert s1.compute_infer.ns > s0.compute_infer.ns and s1.queue.count - s0.queue.count == 2
    # success is each request's time from queueing to answer: never less than the executions it waited for
    assert s1.success.ns - s0.success.ns >= s1.compute_infer.ns - s0.compute_infer.ns
    assert after.last_inference >= before.last_inference and after.last_inference > 0
    assert {b.batch_size for b in after.batch_stats} >= {3, 5}
    assert [s.name for s in client.get_inference_statistics().model_stats] == [MODEL]  # every model
    with pytest.raises(InferenceServerException) as e:
        client.get_inference_statistics("no_such_model")
    assert status(e) == "StatusCode.NOT_FOUND"


def test_repository_index_unload_load(client: tg.InferenceServerClient, server: RunningServer,
                                      capsys: pytest.CaptureFixture) -> None:
    from serving.__main__ import main

    assert [(m.name, m.version, m.state) for m in client.get_model_repository_index().models] == [(MODEL, "1", "READY")]
    client.unload_model(MODEL)
    try:
        assert not client.is_model_ready(MODEL)
        (entry,) = client.get_model_repository_index().models
        assert (entry.state, entry.reason) == ("UNAVAILABLE", "unloaded by request")
        with pytest.raises(InferenceServerException) as e:
            client.infer(MODEL, [infer_input("input", pixels(1).astype(np.float32) / 255, "FP32")])
        assert status(e) == "StatusCode.UNAVAILABLE" and "no ready version" in e.value.message()
        # The command line uses the same RPCs through this project's own stubs.
        assert main(["repository", "index", "--server", server.address]) == 0
        assert "UNAVAILABLE" in capsys.readouterr().out
    finally:
        assert main(["repository", "load", "--server", server.address, MODEL]) == 0
    assert client.is_model_ready(MODEL)
    assert main(["repository", "index", "--server", server.address, "--ready", "--json"]) == 0
    assert '"state": "READY"' in capsys.readouterr().out
    client.unload_model(MODEL)
    client.load_model(MODEL)  # and through Triton's client
    assert client.is_model_ready(MODEL)
    with pytest.raises(InferenceServerException) as e:
        client.load_model("no_such_model")
    assert status(e) == "StatusCode.NOT_FOUND"
    assert main(["repository", "unload", "--server", server.address, "no_such_model"]) == 1


# -- hot swap under load -----------------------------------------------------------------------------------------
def test_hot_swap_under_load_loses_no_request(tmp_path: Path) -> None:
    export_small(tmp_path)
    stop = threading.Event()
    failures: list[str] = []
    versions: list[list[str]] = [[] for _ in range(3)]

    def send(slot: int, address: str) -> None:
        c = tg.InferenceServerClient(address)
        x = [infer_input("input", pixels(2, seed=slot).astype(np.float32) / 255, "FP32")]
        try:
            while not stop.is_set():
                try:
                    versions[slot].append(c.infer(MODEL, x, client_timeout=30).get_response().model_version)
                except InferenceServerException as e:
                    failures.append(f"{e.status()}: {e.message()}")
        finally:
            c.close()

    with running_server(tmp_path, poll_interval_s=0.2) as running:
        threads = [threading.Thread(target=send, args=(i, running.address), daemon=True) for i in range(3)]
        try:
            for t in threads:
                t.start()
            time.sleep(0.5)
            export_small(tmp_path, version=2, seed=1)  # assembled aside, renamed in: the poll sees it whole
            deadline = time.monotonic() + 30
            while not all(v and v[-1] == "2" for v in versions) and time.monotonic() < deadline:
                time.sleep(0.1)
            shutil.rmtree(tmp_path / MODEL / "1")
            running.call(running.server.repository.poll_once())
            marks = [len(v) for v in versions]
            time.sleep(0.5)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        states = {(m.version, m.state) for m in _index(running.address)}
    assert failures == []
    assert all(v[0] == "1" for v in versions), "the first requests are served by version 1"
    assert all(v[m:] and set(v[m:]) == {"2"} for v, m in zip(versions, marks, strict=True))
    assert states == {("1", "UNAVAILABLE"), ("2", "READY")}


def _index(address: str):
    c = tg.InferenceServerClient(address)
    try:
        return c.get_model_repository_index().models
    finally:
        c.close()
