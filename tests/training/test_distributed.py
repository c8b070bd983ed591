"""A real 2-process DDP run (gloo on CPU) through torchrun, as a user would start it."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.training.test_train_export import write_quadrant_idx

ROOT = Path(__file__).resolve().parents[2]


def test_torchrun_two_processes(tmp_path):
    (tmp_path / "idx").mkdir()
    data = write_quadrant_idx(tmp_path / "idx")
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "training", "train", "model=small_fmnist", "dataset=mnist", "verify_checksums=false",
           f"data_dir={data}", "epochs=3",
           "batch_size=32", "lr=0.1", "warmup_epochs=0", f"out_dir={out}", "progress=false",
           "model_args={widths: [8, 8, 8, 8]}", "threads=1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_run"] == 3 and metrics["test_acc"] > 0.5
