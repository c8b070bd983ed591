"""bench/gpu_train.sh's `run` at toy size on the CPU, so that its one GPU command fails for no silly reason."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_train_run_brings_back_what_it_promises(tiny_fmnist, tmp_path):
    """Train, export, score the ONNX file, package it in parts: at most 8 files, the promised ones, and the parts
    reassemble (read-only, as they arrive) into a model repository entry that onnxruntime runs."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "DATA": str(tiny_fmnist), "RUN": str(tmp_path / "run"),
           "OUT": str(out), "NAME": "toy", "PART_SIZE": "12k", "OMP_NUM_THREADS": "1"}
    overrides = ["model=small_fmnist", "model_args={widths: [8, 8, 8, 8]}", "dataset=mnist", "verify_checksums=false",
                 "epochs=2", "batch_size=32", "warmup_epochs=0", "device=cpu", "threads=1", "eval_batch_size=200"]
    proc = subprocess.run(["bash", "bench/gpu_train.sh", "run", *overrides], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]

    files = sorted(p.name for p in out.iterdir())
    parts = [f for f in files if f.startswith("toy.tar.part-")]
    assert set(files) - set(parts) == {"train.log", "metrics.json", "learning_curves.png", "confusion_matrix.png",
                                       "reassemble.sh"}
    assert 2 <= len(parts) and len(files) <= 8
    log = (out / "train.log").read_text()
    assert "torch" in log.split("== train")[0]  # the environment comes first
    assert "ONNX (onnxruntime CPU) test accuracy" in log and "goal >= 95.00%" in log
    assert json.loads((out / "metrics.json").read_text())["epochs_run"] == 2

    for f in out.iterdir():
        f.chmod(0o444)
    subprocess.run(["bash", str(out / "reassemble.sh"), str(tmp_path / "repo")], check=True, capture_output=True)
    model = tmp_path / "repo" / "toy" / "1" / "model.onnx"
    assert (tmp_path / "repo" / "toy" / "config.pbtxt").exists()
    logits = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(
        ["logits"], {"input": np.zeros((3, 1, 28, 28), np.float32)})[0]
    assert logits.shape == (3, 10)
