"""Training loop, ONNX export parity, repository layout, and the CAM math against Grad-CAM."""

import json

import numpy as np
import onnxruntime as ort
import torch
from google.protobuf import text_format

from tests.training.test_data import write_idx
from training.checkpoints import load_checkpoint
from training.config import config_from_dict
from training.export import PARITY_TOLERANCE, export_to_repository, parity_error
from training.models import compute_cam, create_model
from training.train import train


def write_quadrant_idx(d):
    """A learnable toy problem in IDX form: the class is which image quadrant is bright."""
    rng = np.random.default_rng(0)

    def make(n):
        labels = rng.integers(0, 4, n)
        images = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(labels):
            r, col = divmod(int(c), 2)
            images[i, r * 14:(r + 1) * 14, col * 14:(col + 1) * 14] += 200
        return images, labels

    tr, te = make(600), make(200)
    write_idx(d / "train-images-idx3-ubyte.gz", tr[0])
    write_idx(d / "train-labels-idx1-ubyte.gz", tr[1])
    write_idx(d / "t10k-images-idx3-ubyte.gz", te[0])
    write_idx(d / "t10k-labels-idx1-ubyte.gz", te[1])
    return d


def test_training_learns_and_writes_artifacts(tiny_fmnist, tmp_path):
    cfg = config_from_dict({"model": "small_fmnist", "dataset": "mnist", "data_dir": str(tiny_fmnist),
                            "verify_checksums": False,
                            "epochs": 3, "batch_size": 32, "lr": 0.05, "warmup_epochs": 0, "out_dir": str(tmp_path / "run"),
                            "model_args": {"widths": [8, 8, 8, 8]}, "progress": False,
                            "augment": {"crop_padding": 1}})
    metrics = train(cfg)
    assert metrics["test_acc"] > 0.9, metrics
    for name in ("checkpoint.pt", "metrics.json", "config.json", "learning_curves.png", "confusion_matrix.png"):
        assert (tmp_path / "run" / name).exists(), name
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert len(saved["history"]) == 3 and saved["test_acc"] == metrics["test_acc"]
    model, classes = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert len(classes) == 10 and not model.training


def test_export_parity_and_repository_layout(tmp_path):
    from tritonclient.grpc import model_config_pb2 as triton_config

    torch.manual_seed(0)
    model = create_model("small_fmnist")
    vdir = export_to_repository(model, [str(i) for i in range(10)], tmp_path, "net", "small_fmnist")
    assert vdir == tmp_path / "net" / "1"
    assert {p.name for p in vdir.iterdir()} == {"model.onnx", "metadata.json", "cam_weights.npy"}
    meta = json.loads((vdir / "metadata.json").read_text())
    assert meta["parity_max_abs_diff"] <= PARITY_TOLERANCE and meta["parameters"] == 93546
    # The config is valid for Triton: its own schema parses it.
    cfg = text_format.Parse((tmp_path / "net" / "config.pbtxt").read_text(), triton_config.ModelConfig())
    assert cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 64
    assert [o.name for o in cfg.output] == ["logits", "features"]
    assert (tmp_path / "net" / "labels.txt").read_text().split() == [str(i) for i in range(10)]
    # Dynamic batch axis: any batch size runs.
    sess = ort.InferenceSession(str(vdir / "model.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 3, 17):
        logits, feats = sess.run(None, {"input": np.random.rand(n, 1, 28, 28).astype(np.float32)})
        assert logits.shape == (n, 10) and feats.shape == (n, 64, 7, 7)
    assert parity_error(model, vdir / "model.onnx", torch.rand(5, 1, 28, 28)) <= PARITY_TOLERANCE
    # A second export gets the next version.
    assert export_to_repository(model, [str(i) for i in range(10)], tmp_path, "net", "small_fmnist").name == "2"


def test_cam_equals_gradcam_up_to_relu_and_scale():
    """For GAP + linear, Grad-CAM's channel weights are dy_k/df_c averaged over space = W[k,c] / (h*w),
    so Grad-CAM = ReLU(CAM / (h*w)) exactly."""
    torch.manual_seed(1)
    model = create_model("small_fmnist").eval()
    x = torch.rand(4, 1, 28, 28)
    features = model.forward_features(x).detach().requires_grad_(True)
    logits = model.forward_head(features)
    classes = logits.argmax(1)
    logits.gather(1, classes[:, None]).sum().backward()
    alpha = features.grad.mean(dim=(2, 3), keepdim=True)
    h, w = features.shape[2:]
    gradcam = torch.relu((alpha * features).sum(1))
    cam = compute_cam(features.detach(), model.cam_weights(), classes)
    torch.testing.assert_close(gradcam, torch.relu(cam / (h * w)), rtol=1e-5, atol=1e-6)
    # And the CAM's spatial mean plus the bias is the logit itself.
    bias = model.head.fc.bias[classes]
    torch.testing.assert_close(cam.mean(dim=(1, 2)) + bias, logits.gather(1, classes[:, None])[:, 0].detach(),
                               rtol=1e-5, atol=1e-5)


def test_reduced_precision_versions(tmp_path, monkeypatch):
    from training import quantize

    torch.manual_seed(0)
    model = create_model("small_fmnist")
    v1 = export_to_repository(model, [str(i) for i in range(10)], tmp_path, "net", "small_fmnist")
    rng = np.random.default_rng(0)
    images = rng.random((64, 1, 28, 28), dtype=np.float32)
    sess = ort.InferenceSession(str(v1 / "model.onnx"), providers=["CPUExecutionProvider"])
    labels = sess.run(["logits"], {"input": images})[0].argmax(1)  # fp32 predictions as the reference labels
    monkeypatch.setattr(quantize, "load_test_data", lambda data_dir, shape: (images, labels))
    written = quantize.export_reduced_precision(v1, fp16=True, quantize="dynamic")
    assert [p.name for p in written] == ["2", "3"]
    for path, precision in zip(written, ("fp16", "int8-dynamic")):
        meta = json.loads((path / "metadata.json").read_text())
        assert meta["precision"] == precision and meta["derived_from_version"] == 1
        assert meta["metrics"]["test_acc"] >= 0.8  # agreement with fp32 predictions
        # The change is measured on this version's own file against the FP32 one, on data that is named.
        assert meta["fp32_test_acc"] == 1.0 and meta["measured_on"].endswith("64 images")
        assert meta["accuracy_change_vs_fp32"] == meta["metrics"]["test_acc"] - 1.0
        got = ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"]).run(
            ["logits"], {"input": images})[0]
        assert got.dtype == np.float32 and got.shape == (64, 10)
    assert (written[1] / "model.onnx").stat().st_size < (v1 / "model.onnx").stat().st_size / 2
