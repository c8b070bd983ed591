"""Reduced-precision versions of an exported model: FP16 weights and INT8 (dynamic or static) quantisation
with onnxruntime.quantization. Each is written as a new version of the same model, its accuracy change on
the test set (when the data is around) recorded in its metadata.json.

The graph's inputs and outputs stay float32, so clients and the server need no change; only the version
number differs (pin it in requests, or serve it with version_policy).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from serving.repository_format import METADATA_FILE, MODEL_FILE, next_version, staged_version


def _accuracy(model_path: Path, images: np.ndarray, labels: np.ndarray) -> float:
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    preds = np.concatenate([sess.run(["logits"], {"input": images[i:i + 500]})[0].argmax(1)
                            for i in range(0, len(images), 500)])
    return float((preds == labels).mean())


def _test_data(data_dir: str | None, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        from .augment import to_model_input
        from .data import load_idx_dataset
        test = load_idx_dataset("fashion-mnist", data_dir).test
    except Exception:  # noqa: BLE001 - without data the variants are written, unmeasured
        return None
    if test is None:
        return None
    return to_model_input(test.images, shape[0], shape[1:]).numpy(), test.labels


def _new_version(source: Path, convert, precision: str, reference_acc: float | None,
                 data: tuple[np.ndarray, np.ndarray] | None) -> Path:
    model_dir = source.parent
    final = model_dir / str(next_version(model_dir))
    with staged_version(model_dir, final) as staging:
        shutil.copytree(source, staging)
        convert(str(source / MODEL_FILE), str(staging / MODEL_FILE))
        meta = json.loads((staging / METADATA_FILE).read_text())
        meta["precision"] = precision
        meta["derived_from_version"] = int(source.name)
        meta["onnx_bytes"] = (staging / MODEL_FILE).stat().st_size
        if data is not None:
            acc = _accuracy(staging / MODEL_FILE, *data)
            meta.setdefault("metrics", {})["test_acc"] = acc
            meta["accuracy_change_vs_fp32"] = acc - reference_acc if reference_acc is not None else None
            print(f"{precision}: test accuracy {100 * acc:.2f}% ({100 * (acc - reference_acc):+.2f} points), "
                  f"{meta['onnx_bytes'] / 1e6:.2f} MB")
        (staging / METADATA_FILE).write_text(json.dumps(meta, indent=1))
    return final


def export_reduced_precision(version_dir: Path, fp16: bool, quantize: str | None,
                             data_dir: str | None = None) -> list[Path]:
    sess = ort.InferenceSession(str(version_dir / MODEL_FILE), providers=["CPUExecutionProvider"])
    shape = tuple(int(d) for d in sess.get_inputs()[0].shape[1:])
    data = _test_data(data_dir, shape)
    reference = _accuracy(version_dir / MODEL_FILE, *data) if data is not None else None
    written = []
    if fp16:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        def to_fp16(src: str, dst: str) -> None:
            onnx.save(convert_float_to_float16(onnx.load(src), keep_io_types=True), dst)

        written.append(_new_version(version_dir, to_fp16, "fp16", reference, data))
    if quantize == "dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        written.append(_new_version(version_dir, lambda s, d: quantize_dynamic(s, d, weight_type=QuantType.QInt8),
                                    "int8-dynamic", reference, data))
    elif quantize == "static":
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

        calibration = data[0][:512] if data is not None else np.random.rand(64, *shape).astype(np.float32)

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.batches = iter([{"input": calibration[i:i + 32]} for i in range(0, len(calibration), 32)])

            def get_next(self):
                return next(self.batches, None)

        def to_int8(src: str, dst: str) -> None:
            with tempfile.TemporaryDirectory() as tmp:
                # Shape inference and graph cleanup first, as onnxruntime's quantisation guide advises.
                from onnxruntime.quantization.shape_inference import quant_pre_process
                pre = str(Path(tmp) / "pre.onnx")
                quant_pre_process(src, pre)
                quantize_static(pre, dst, Reader(), quant_format=QuantFormat.QDQ)

        written.append(_new_version(version_dir, to_int8, "int8-static", reference, data))
    return written
