"""onnxruntime sessions: provider choice and the I/O-binding path the GPU uses, checked here on the CPU."""

import numpy as np
import onnxruntime as ort
import pytest

from serving.engine import runtime
from serving.engine.runtime import OrtSessions, RuntimeOptions, choose_providers


@pytest.fixture(scope="module")
def model_file(small_repo):
    return small_repo / "fmnist" / "1" / "model.onnx"


def test_io_binding_path_gives_the_plain_run(model_file):
    """The GPU path binds the input and the requested outputs; the same calls work on the CPU provider, so
    the code that a GPU machine runs is exercised here too."""
    model = OrtSessions(model_file, "input", ["logits", "features"], options=RuntimeOptions(device="cpu"))
    x = np.random.default_rng(0).random((5, 1, 28, 28), dtype=np.float32)
    plain = model.run(x, ["logits", "features"])
    model._use_binding = True
    bound = model.run(x, ["logits", "features"])
    only_logits = model.run(x, ["logits"])
    for a, b in zip(plain, bound):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert len(only_logits) == 1 and only_logits[0].shape == (5, 10)


def names(providers: list) -> list[str]:
    return [p[0] if isinstance(p, tuple) else p for p in providers]


def test_provider_order(monkeypatch):
    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: gpu)  # what onnxruntime-gpu lists on a GPU machine
    assert names(choose_providers(RuntimeOptions())) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    trt = choose_providers(RuntimeOptions(tensorrt=True, trt_cache_dir="/tmp/engines"))
    assert names(trt) == gpu
    assert trt[0][1]["trt_engine_cache_enable"] and trt[0][1]["trt_engine_cache_path"] == "/tmp/engines"
    assert choose_providers(RuntimeOptions(cuda_graphs=True))[0][1]["enable_cuda_graph"] == "1"
    assert "enable_cuda_graph" not in choose_providers(RuntimeOptions(cuda_graphs=True, tensorrt=True))[1][1]
    assert names(choose_providers(RuntimeOptions(device="cpu"))) == ["CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(RuntimeError, match="device=cuda"):
        choose_providers(RuntimeOptions(device="cuda"))


def test_provider_reported_is_the_one_the_session_got(model_file, caplog):
    """onnxruntime-gpu lists CUDA even without a GPU and falls back silently: we report what really runs."""
    model = OrtSessions(model_file, "input", ["logits"], options=RuntimeOptions(device="auto"))
    assert model.provider == model.sessions[0].get_providers()[0]
    if "CUDAExecutionProvider" in ort.get_available_providers() and model.provider == "CPUExecutionProvider":
        assert "CUDAExecutionProvider" in runtime._fallback_reported


def test_bucketed_binding_pads_to_its_bucket_and_matches_plain_runs(model_file):
    """The CUDA-graph runner's logic (buffers bound once per bucket, padding, slicing back), on the CPU."""
    from serving.engine.runtime import BucketedBinding, batch_buckets

    assert batch_buckets(12) == [1, 2, 4, 8, 12] and batch_buckets(1) == [1]
    model = OrtSessions(model_file, "input", ["logits", "features"], options=RuntimeOptions(device="cpu"))
    runner = BucketedBinding(model.sessions[0], "input", device="cpu")
    runner.prepare((1, 28, 28), 12, ["logits", "features"])
    assert list(runner.slots) == [1, 2, 4, 8, 12]
    rng = np.random.default_rng(1)
    for k in (1, 3, 8, 11, 12, 2):  # small after large: stale padding rows must not leak into results
        x = rng.random((k, 1, 28, 28), dtype=np.float32)
        logits, features = runner.run(x, ["logits", "features"])
        expected = model.sessions[0].run(["logits", "features"], {"input": x})
        np.testing.assert_allclose(logits, expected[0], atol=1e-5)
        np.testing.assert_allclose(features, expected[1], atol=1e-5)
        assert runner.run(x, ["logits"])[0].shape == (k, 10)
    with pytest.raises(RuntimeError, match="larger than the largest bucket"):
        runner.run(np.zeros((13, 1, 28, 28), np.float32), ["logits"])
