"""Export any registered model to ONNX and write it into a versioned, Triton-compatible model repository.

One code path for every model: the graph takes `input` [B, C, H, W] (pixels in [0, 1]; normalisation is
inside) and gives `logits` [B, K] and `features` (the last conv maps, for CAM). The export is checked with
onnx.checker and against PyTorch on a real batch; it fails above the tolerance.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from serving.repository_format import (
    CAM_WEIGHTS_FILE,
    LABELS_FILE,
    MODEL_FILE,
    Preprocessing,
    VersionMetadata,
    build_config,
    next_version,
    staged_version,
    write_config,
)
from serving.wire.inference import model_config_pb2 as mc

from .models import CamUnsupported, ImageClassifier, create_model, list_models

log = logging.getLogger("training.export")

OPSET = 17
PARITY_TOLERANCE = 1e-4
INPUT, LOGITS, FEATURES = "input", "logits", "features"


class ExportError(RuntimeError):
    pass


class _ExportWrapper(nn.Module):
    def __init__(self, model: ImageClassifier):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.forward_features(x)
        return self.model.forward_head(features), features


def export_onnx(model: ImageClassifier, path: Path, opset: int = OPSET) -> None:
    model = model.eval()
    c, (h, w) = model.in_channels, model.input_size
    example = torch.rand(2, c, h, w)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _ExportWrapper(model), (example,), str(path), input_names=[INPUT], output_names=[LOGITS, FEATURES],
            dynamic_axes={INPUT: {0: "batch"}, LOGITS: {0: "batch"}, FEATURES: {0: "batch"}},
            opset_version=opset, dynamo=False, do_constant_folding=True,
        )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def parity_error(model: ImageClassifier, path: Path, batch: torch.Tensor) -> float:
    """Max abs difference of logits and features between PyTorch and onnxruntime on `batch`."""
    model = model.eval()
    with torch.no_grad():
        f = model.forward_features(batch)
        ref = [model.forward_head(f).numpy(), f.numpy()]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run([LOGITS, FEATURES], {INPUT: batch.numpy()})
    return float(max(np.abs(a - b).max() for a, b in zip(ref, got)))


def _cam_weights(model: ImageClassifier) -> tuple[np.ndarray | None, str]:
    try:
        return model.cam_weights().cpu().numpy().astype(np.float32), ""
    except CamUnsupported as e:
        return None, str(e)


def model_config(name: str, model: ImageClassifier, max_batch_size: int, extra: dict[str, str]) -> mc.ModelConfig:
    """The config.pbtxt of `model` (`build_config` with the shapes and normalisation this model has)."""
    c, (h, w) = model.in_channels, model.input_size
    with torch.no_grad():
        features = model.forward_features(torch.zeros(1, c, h, w))
        fshape, out_classes = list(features.shape[1:]), int(model.forward_head(features).shape[1])
    pre = Preprocessing(c, h, w, [round(v, 6) for v in model.mean.flatten().tolist()],
                        [round(v, 6) for v in model.std.flatten().tolist()])
    return build_config(name, pre, INPUT, (LOGITS, out_classes), (FEATURES, fshape), max_batch_size, extra)


def export_to_repository(model: ImageClassifier, classes: list[str], repository: Path, name: str,
                         architecture: str, metrics: dict | None = None, version: int | None = None,
                         max_batch_size: int = 64, check_batch: torch.Tensor | None = None,
                         precision: str = "fp32", check_data: str = "") -> Path:
    """Write <repo>/<name>/<version>/model.onnx (+ metadata, CAM weights), config.pbtxt and labels.txt.

    The version directory is assembled aside and renamed into the repository (`staged_version`). The parity
    check runs on `check_batch`, which `check_data` describes (default: 8 images of random pixels).
    """
    model = model.eval()
    model_dir = repository / name
    model_dir.mkdir(parents=True, exist_ok=True)
    version = version or next_version(model_dir)
    final = model_dir / str(version)
    if final.exists():
        raise ExportError(f"{final} exists already; pick another --version")
    c, (h, w) = model.in_channels, model.input_size
    if check_batch is None:
        check_batch = torch.rand(8, c, h, w, generator=torch.Generator().manual_seed(0))
        check_data = "images of random pixels"
    check_data = f"{len(check_batch)} {check_data or 'given images'}"
    with staged_version(model_dir, final) as staging:
        started = time.time()
        export_onnx(model, staging / MODEL_FILE)
        err = parity_error(model, staging / MODEL_FILE, check_batch)
        print(f"{name}: ONNX parity max abs difference {err:.2e} on {check_data} ({time.time() - started:.1f}s)")
        if err > PARITY_TOLERANCE:
            raise ExportError(f"{name}: ONNX output differs from PyTorch by {err:.2e} > {PARITY_TOLERANCE:g}")
        weights, reason = _cam_weights(model)
        if weights is not None:
            np.save(staging / CAM_WEIGHTS_FILE, weights)
        VersionMetadata(
            architecture=architecture, parameters=sum(p.numel() for p in model.parameters()), precision=precision,
            opset=OPSET, exported_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            onnx_bytes=(staging / MODEL_FILE).stat().st_size, parity_max_abs_diff=err, parity_data=check_data,
            metrics=metrics or {}, cam_unsupported_reason=reason,
        ).write(staging)
        write_config(model_dir, model_config(name, model, max_batch_size, {"architecture": architecture}))
        (model_dir / LABELS_FILE).write_text("\n".join(classes) + "\n")
    return final


def _metrics_of(checkpoint: Path) -> dict:
    path = checkpoint.parent / "metrics.json"
    if not path.exists():
        return {}
    m = json.loads(path.read_text())
    return {k: m[k] for k in ("test_acc", "test_loss", "best_val_acc", "epochs_run", "train_time_s") if k in m}


def export_main(args: argparse.Namespace) -> None:
    from .checkpoints import load_checkpoint
    from .config import UsageError

    repo = Path(args.model_repository)
    if args.all:
        if args.fp16 or args.quantize:
            raise UsageError("--fp16 and --quantize take one checkpoint, not --all")
        ckpt_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else None
        chosen = args.models.split(",") if getattr(args, "models", None) else list_models()
        unknown = sorted(set(chosen) - set(list_models()))
        if unknown:
            raise UsageError(f"--models: {', '.join(unknown)} not registered (python -m training models lists them)")
        for arch in chosen:
            ckpt = ckpt_dir / arch / "checkpoint.pt" if ckpt_dir else None
            if ckpt and ckpt.exists():
                model, classes = load_checkpoint(ckpt)
                metrics = _metrics_of(ckpt)
            else:
                torch.manual_seed(0)
                model = create_model(arch, in_channels=1, num_classes=10, input_size=(28, 28))
                classes, metrics = [str(i) for i in range(10)], {"note": "random weights"}
            export_to_repository(model, classes, repo, arch, arch, metrics, max_batch_size=args.max_batch_size)
        return
    if not args.checkpoint:
        raise UsageError("export needs a checkpoint (or --all)")
    ckpt = Path(args.checkpoint)
    if not ckpt.is_file():
        raise UsageError(f"{ckpt}: no such checkpoint (train writes <out_dir>/checkpoint.pt)")
    model, classes = load_checkpoint(ckpt)
    if args.fp16 or args.quantize:
        # A reduced-precision version becomes the newest, and the default version policy serves the newest: it
        # must never be served unmeasured. Without the test set nothing is written.
        from .quantize import MissingTestData, load_test_data
        try:
            load_test_data(args.data_dir, (model.in_channels, *model.input_size))
        except MissingTestData as e:
            flags = " ".join(f for f, on in (("--fp16", args.fp16), (f"--quantize {args.quantize}", args.quantize)) if on)
            raise UsageError(f"{flags} needs the test set to measure the reduced-precision version against FP32 "
                             f"before it is served, and none was found ({e}); give --data-dir DIR. Nothing was "
                             f"written.") from None
    state = torch.load(ckpt, weights_only=True)
    arch = state["model_name"]
    check, described = _real_batch(model, args.data_dir)
    path = export_to_repository(model, classes, repo, args.name or arch, arch, _metrics_of(ckpt), args.version,
                                args.max_batch_size, check, check_data=described)
    print(f"wrote {path}")
    if args.fp16 or args.quantize:
        from .quantize import export_reduced_precision
        export_reduced_precision(path, args.fp16, args.quantize, args.data_dir)


def _real_batch(model: ImageClassifier, data_dir: str | None) -> tuple[torch.Tensor, str]:
    """A batch of real test images when the dataset is around, else random pixels; and which it is."""
    try:
        from .augment import to_model_input
        from .data import load_idx_dataset
        ds = load_idx_dataset("fashion-mnist", data_dir)
        if ds.test is not None:
            return to_model_input(ds.test.images[:64], model.in_channels, model.input_size), "Fashion-MNIST test images"
    except Exception:  # noqa: BLE001 - the check still runs, on random data, and says so
        pass
    c, (h, w) = model.in_channels, model.input_size
    return (torch.rand(64, c, h, w, generator=torch.Generator().manual_seed(0)),
            "images of random pixels (no Fashion-MNIST test set found: --data-dir DIR checks on real ones)")
