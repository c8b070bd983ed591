"""End to end through the real server and the real client: classify, explain, discovery, errors."""

import io

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from serving.client import AsyncClassifierClient, ClassifierClient
from tests.conftest import LABELS
from training.models import create_model


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)


@pytest.fixture(scope="module")
def torch_model():
    torch.manual_seed(0)  # the same seed tests/conftest.py exported
    return create_model("small_fmnist", in_channels=1, num_classes=10, input_size=(28, 28)).eval()


@pytest.fixture(scope="module")
def client(server):
    with ClassifierClient(server.address) as c:
        yield c


def torch_probs(model, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(images[:, None].astype(np.float32) / 255)).softmax(1).numpy()


def test_classify_png_matches_pytorch(client, images, torch_model):
    results = client.classify([png(im) for im in images], model="fmnist", top_k=3)
    expected = torch_probs(torch_model, images)
    assert len(results) == len(images)
    for preds, probs in zip(results, expected):
        assert len(preds) == 3
        assert [p.index for p in preds] == np.argsort(-probs)[:3].tolist()
        assert preds[0].label == LABELS[preds[0].index]
        assert preds[0].score == pytest.approx(probs[preds[0].index], abs=1e-5)
        assert preds[0].score >= preds[1].score >= preds[2].score


def test_tensor_inputs_and_conversions(client, images, torch_model):
    """Raw uint8 pixels, float model input, RGB and a larger image all reach the same answer shape."""
    expected = torch_probs(torch_model, images[:1])[0]
    as_pixels = client.classify([images[0]], top_k=10)[0]
    as_float = client.classify([images[0][None].astype(np.float32) / 255], top_k=10)[0]
    rgb = client.classify([png(np.repeat(images[0][:, :, None], 3, axis=2))], top_k=10)[0]
    for preds in (as_pixels, as_float, rgb):
        got = np.array([p.score for p in sorted(preds, key=lambda p: p.index)])
        np.testing.assert_allclose(got, expected, atol=1e-5)
    big = client.classify([png(np.kron(images[0], np.ones((3, 3), np.uint8)))], top_k=1)[0]
    assert len(big) == 1  # 84x84 resized to 28x28 and answered


def test_explain_matches_pytorch_cam(client, images, torch_model):
    import torch.nn.functional as F

    from training.models import compute_cam

    explanations = client.explain([png(im) for im in images], model="fmnist", overlay=True)
    x = torch.from_numpy(images[:, None].astype(np.float32) / 255)
    with torch.no_grad():
        f = torch_model.forward_features(x)
        classes = torch_model.forward_head(f).argmax(1)
        cam = F.interpolate(compute_cam(f, torch_model.cam_weights(), classes)[:, None], size=(28, 28),
                            mode="bilinear", align_corners=False)[:, 0]
        lo, hi = cam.amin(dim=(1, 2), keepdim=True), cam.amax(dim=(1, 2), keepdim=True)
        expected = ((cam - lo) / (hi - lo)).numpy()
    for e, cls, ref in zip(explanations, classes.tolist(), expected):
        assert e.target.index == cls
        assert e.heatmap.shape == (28, 28) and e.heatmap.dtype == np.float32
        assert 0.0 <= e.heatmap.min() and e.heatmap.max() <= 1.0
        assert np.abs(e.heatmap - ref).max() <= 1e-4
        overlay = Image.open(io.BytesIO(e.overlay_png))
        assert overlay.format == "PNG" and overlay.size[0] >= 224


def test_explain_for_a_requested_class(client, images):
    e = client.explain([png(images[0])], target_class=7)[0]
    assert e.target.index == 7 and e.target.label == LABELS[7]
    assert e.overlay_png == b""


def test_discovery(client):
    assert client.list_models() == {"fmnist": [1]}
    info = client.get_model("fmnist")
    assert info.labels == LABELS and info.input_shape == (1, 28, 28)
    assert info.execution_provider == "CPUExecutionProvider"
    assert info.supports_cam and info.architecture == "small_fmnist" and info.parameters == 93546
    assert info.metrics["test_acc"] == 0.5  # a number, typed as one
    assert info.versions == [(1, "READY", "")]


@pytest.mark.parametrize("images, code, fragment", [
    ([b"not an image"], grpc.StatusCode.INVALID_ARGUMENT, "cannot decode image"),
    ([b""], grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    ([], grpc.StatusCode.INVALID_ARGUMENT, "no images"),
    ([np.zeros((3, 28, 28), np.float32)], grpc.StatusCode.INVALID_ARGUMENT, "model input [1, 28, 28]"),
    ([np.full((1, 28, 28), np.nan, np.float32)], grpc.StatusCode.INVALID_ARGUMENT, "NaN"),
    ([np.zeros((28, 28, 2), np.uint8)], grpc.StatusCode.INVALID_ARGUMENT, "[H, W] or [H, W, C]"),
])
def test_bad_input_is_invalid_argument(client, images, code, fragment):
    with pytest.raises(grpc.RpcError) as err:
        client.classify(images, model="fmnist")
    assert err.value.code() == code
    assert fragment in err.value.details()


def test_one_bad_image_does_not_fail_others(server, images):
    """Concurrent requests share a batch; only the broken one fails."""
    import concurrent.futures as cf

    with ClassifierClient(server.address) as c, cf.ThreadPoolExecutor(8) as pool:
        good = [pool.submit(c.classify, [png(images[i % 6])]) for i in range(16)]
        bad = pool.submit(c.classify, [b"\x89PNG broken"])
        assert all(len(f.result()) == 1 for f in good)
        with pytest.raises(grpc.RpcError) as err:
            bad.result()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_unknown_model_and_version(client, images):
    with pytest.raises(grpc.RpcError) as err:
        client.classify([png(images[0])], model="nope")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "fmnist" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        client.classify([png(images[0])], model="fmnist", version=9)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        client.explain([png(images[0])], model="fmnist", target_class=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_health_and_reflection(server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.address) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="classifier.v1.Classifier"))
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        responses = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in responses[0].list_services_response.service}
        assert {"classifier.v1.Classifier", "grpc.health.v1.Health"} <= names
        files = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="classifier.v1.Classifier")])))
        assert files[0].file_descriptor_response.file_descriptor_proto


def test_async_client_and_stream(server, images):
    import asyncio

    async def run():
        async with AsyncClassifierClient(server.address) as c:
            preds = await c.classify([png(images[0])], top_k=2)
            batches = [(f"r{i}", [png(images[i % 6])] * (i + 1)) for i in range(5)]
            answers = [r async for r in c.classify_stream(batches, window=2)]
            return preds, answers

    preds, answers = asyncio.run(run())
    assert len(preds[0]) == 2
    assert [a.request_id for a in answers] == [f"r{i}" for i in range(5)]
    assert [len(a.predictions) for a in answers] == [1, 2, 3, 4, 5]


def test_stream_reports_item_errors_and_goes_on(client, images):
    batches = [("ok1", [png(images[0])]), ("bad", [b"junk"]), ("ok2", [png(images[1])])]
    answers = list(client.classify_stream(batches))
    assert [a.request_id for a in answers] == ["ok1", "bad", "ok2"]
    assert answers[1].error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert len(answers[2].predictions) == 1 and answers[2].ok and answers[1].error.code() == grpc.StatusCode.INVALID_ARGUMENT
