"""Real 2-process DDP runs (gloo on CPU) through torchrun, as a user would start them."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.training.test_train_export import write_quadrant_idx

ROOT = Path(__file__).resolve().parents[2]


def torchrun_train(tmp_path: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, Path]:
    (tmp_path / "idx").mkdir()
    data = write_quadrant_idx(tmp_path / "idx")
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "training", "train", "model=small_fmnist", "dataset=mnist", "verify_checksums=false",
           f"data_dir={data}", "batch_size=32", "lr=0.1", "warmup_epochs=0", f"out_dir={out}", "progress=false",
           "model_args={widths: [8, 8, 8, 8]}", "threads=1", "device=cpu", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc, out


def test_torchrun_two_processes(tmp_path):
    # 513 images: 257 and 256 by a plain stride, 9 and 8 steps of 32; equal shards keep the all-reduces paired.
    proc, out = torchrun_train(tmp_path, "epochs=3", "max_train_samples=513")
    assert "2 process(es)" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_run"] == 3 and metrics["test_acc"] > 0.5
    assert metrics["setup"]["global_batch_size"] == 64


def test_torchrun_stops_every_process_together(tmp_path):
    """The main process decides an early stop (here the time limit); the other one stops with it instead of
    waiting at the next all-reduce for ever."""
    _, out = torchrun_train(tmp_path, "epochs=5", "time_limit_s=0.000001")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_run"] == 1 and "time limit" in metrics["stopped_early"]
