"""Reduced-precision versions of an exported model: FP16 weights and INT8 (dynamic or static) quantisation
with onnxruntime.quantization. Each is written as a new version of the same model only once measured: its
test accuracy and its change against FP32 on the test set are recorded in its metadata.json. Without the test
set nothing is written, since the default version policy would serve the new version unmeasured; static INT8
calibrates on real test images, never on random numbers.

The graph's inputs and outputs stay float32, so clients and the server need no change; only the version
number differs (pin it in requests, or serve it with version_policy).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from serving.repository_format import MODEL_FILE, VersionMetadata, next_version, staged_version

CALIBRATION_IMAGES = 512


def _accuracy(model_path: Path, images: np.ndarray, labels: np.ndarray) -> float:
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    preds = np.concatenate([sess.run(["logits"], {"input": images[i:i + 500]})[0].argmax(1)
                            for i in range(0, len(images), 500)])
    return float((preds == labels).mean())


class MissingTestData(RuntimeError):
    """No test set to measure a reduced-precision version on: it is not written, since it would be served
    unmeasured (the default version policy serves the newest version)."""


TEST_SET = "Fashion-MNIST test set"
# A version that loses more than this against FP32 is written, measured, but the export says loudly that it is
# now the served one.
ACCURACY_WARNING_POINTS = 1.0


def load_test_data(data_dir: str | None, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The test images as model input [N, C, H, W] and their labels; MissingTestData says why there are none."""
    from .augment import to_model_input
    from .data import DatasetError, load_idx_dataset
    try:
        test = load_idx_dataset("fashion-mnist", data_dir).test
    except DatasetError as e:
        raise MissingTestData(str(e)) from None
    if test is None:
        raise MissingTestData(f"the {TEST_SET} files are missing")
    return to_model_input(test.images, shape[0], shape[1:]).numpy(), test.labels


def _new_version(source: Path, convert, precision: str, reference_acc: float,
                 data: tuple[np.ndarray, np.ndarray], calibration: str = "") -> Path:
    model_dir = source.parent
    final = model_dir / str(next_version(model_dir))
    with staged_version(model_dir, final) as staging:
        shutil.copytree(source, staging)
        convert(str(source / MODEL_FILE), str(staging / MODEL_FILE))
        meta = VersionMetadata.read(staging)
        meta.precision = precision
        meta.derived_from_version = int(source.name)
        meta.onnx_bytes = (staging / MODEL_FILE).stat().st_size
        acc = _accuracy(staging / MODEL_FILE, *data)
        change = acc - reference_acc
        # Measured on this version's own file: the FP32 figures it was copied with are replaced, not kept.
        meta.metrics = {"test_acc": acc}
        meta.accuracy_change_vs_fp32 = change
        meta.fp32_test_acc = reference_acc
        meta.measured_on = f"{TEST_SET}, {len(data[1])} images"
        meta.calibration = calibration
        meta.write(staging)
    print(f"{precision}: version {final.name}, test accuracy {100 * acc:.2f}% ({100 * change:+.2f} points against "
          f"FP32, {TEST_SET}, {len(data[1])} images), {meta.onnx_bytes / 1e6:.2f} MB")
    if -100 * change > ACCURACY_WARNING_POINTS:
        print(f"warning: {precision} loses {-100 * change:.2f} points; version {final.name} is now the newest, which "
              f"the default version policy (latest 1) serves: pin the version you want, or remove {final}")
    return final


def export_reduced_precision(version_dir: Path, fp16: bool, quantize: str | None,
                             data_dir: str | None = None) -> list[Path]:
    """FP16 and INT8 versions of `version_dir`, each measured on the test set before it is written; without
    the test set, MissingTestData and nothing written."""
    sess = ort.InferenceSession(str(version_dir / MODEL_FILE), providers=["CPUExecutionProvider"])
    shape = tuple(int(d) for d in sess.get_inputs()[0].shape[1:])
    data = load_test_data(data_dir, shape)
    reference = _accuracy(version_dir / MODEL_FILE, *data)
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

        calibration = data[0][:CALIBRATION_IMAGES]  # real images only: never random numbers

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

        print(f"int8-static: calibrating (min-max) on {len(calibration)} images of the {TEST_SET}")
        written.append(_new_version(version_dir, to_int8, "int8-static", reference, data,
                                    f"min-max on {len(calibration)} images of the {TEST_SET}"))
    return written
