"""`python -m serving batch` as a user runs it: input mistakes are one line and exit code 2 on either engine,
flags of the other engine are refused rather than ignored, a log gets no progress-bar updates, CAM files are
named once, and a label the model does not have counts the same in accuracy and precision."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serving.jobs.report import summarize
from tests.cli_run import one_line_error, run_module
from tests.conftest import ramp_images

ROOT = Path(__file__).resolve().parents[2]


def batch(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_module("serving", "batch", *args, env=env)


@pytest.mark.parametrize("engine", ["grpc", "ray"])
def test_a_file_that_is_not_an_npz_is_one_line(engine, tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_text("hello")
    line = one_line_error(batch("--engine", engine, bad, "-o", tmp_path / "out.jsonl"))
    assert line.startswith(f"error: {bad} is not a readable .npz")


@pytest.mark.parametrize("engine, flag", [("grpc", ["--ray-address", "auto"]), ("grpc", ["--num-actors", "2"]),
                                          ("ray", ["--window", "4"]), ("ray", ["--server", "h:1"])])
def test_flags_of_the_other_engine_are_refused(engine, flag, tmp_path):
    np.savez(tmp_path / "set.npz", images=ramp_images(4, seed=1)[0])
    line = one_line_error(batch("--engine", engine, *flag, tmp_path / "set.npz", "-o", tmp_path / "out.jsonl"))
    assert line == f"error: {flag[0]} does nothing with --engine {engine}"


def test_no_progress_bar_updates_in_a_log_and_cam_files_named_once(server, tmp_path):
    root = tmp_path / "photos"
    for i, image in enumerate(ramp_images(6, seed=2)[0]):
        folder = root / ("Bag" if i % 2 else "Coat")
        folder.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        (folder / f"img{i}.png").write_bytes(buf.getvalue())
    cams = tmp_path / "cams"
    result = batch(root, "--server", server.address, "-o", tmp_path / "out.jsonl", "--cam-dir", cams)
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stdout + result.stderr  # stderr is a pipe here: the bar stays off by itself
    names = sorted(p.name for p in cams.iterdir())
    assert names[0] == "Bag_img1_cam.png" and len(names) == 6
    assert not any(name.endswith(".png.png") for name in names)
    again = batch(root, "--server", server.address, "-o", tmp_path / "out.jsonl")  # resumed, nothing to do
    assert again.returncode == 0 and "\r" not in again.stderr and "100%" not in again.stderr


def test_a_label_the_model_lacks_counts_against_precision_as_against_accuracy():
    classes = ["Bag", "Coat"]
    rows = [{"id": "1", "labels": ["Bag"], "scores": [0.9], "true_label": "Bag", "correct": True},
            {"id": "2", "labels": ["Bag"], "scores": [0.8], "true_label": "Handbag", "correct": False},
            {"id": "3", "labels": ["Coat"], "scores": [0.7], "true_label": "Coat", "correct": True}]
    summary = summarize(rows, classes)
    assert summary["accuracy"] == pytest.approx(2 / 3)  # the handbag is a mistake...
    assert summary["per_class"]["Bag"]["precision"] == pytest.approx(1 / 2)  # ...and a wrong "Bag" too
    assert summary["per_class"]["Bag"]["recall"] == 1.0 and summary["labels_not_in_model"] == {"Handbag": 1}


def test_parquet_without_pyarrow_names_the_extra_and_leaves_nothing(server, tmp_path):
    """pyarrow made unimportable, as in the base install: the job says which extra brings it, before any
    output folder exists."""
    np.savez(tmp_path / "set.npz", images=ramp_images(4, seed=3)[0])
    out = tmp_path / "c.parquet"
    code = ("import sys; sys.modules['pyarrow'] = None\n"
            "from serving.__main__ import main\n"
            f"sys.exit(main(['batch', {str(tmp_path / 'set.npz')!r}, '--server', {server.address!r}, '-o', {str(out)!r}]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "pip install 'cnn-serving[parquet]'" in result.stderr
    assert not out.exists()


def test_a_model_version_is_pinned_or_refused(server, tmp_path):
    np.savez(tmp_path / "set.npz", images=ramp_images(4, seed=4)[0])
    pinned = batch(tmp_path / "set.npz", "--server", server.address, "--model-version", "1", "-o", tmp_path / "a.jsonl")
    assert pinned.returncode == 0, pinned.stderr
    assert "with fmnist v1" in pinned.stderr
    missing = batch(tmp_path / "set.npz", "--server", server.address, "--model-version", "9", "-o", tmp_path / "b.jsonl")
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr and "Traceback" not in missing.stderr
