"""The base install is the client: a fresh virtualenv with `pip install <project>` (no extras) holds no
onnxruntime, Pillow or torch, stays small, and classifies, explains and runs a batch job against a real
server started from the full install."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import textwrap
import venv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
CLIENT_VENV_LIMIT_MB = 120


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) / 1e6


@pytest.fixture(scope="module")
def client_python(tmp_path_factory) -> Path:
    env_dir = tmp_path_factory.mktemp("client") / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    # A wheel built from a copy of the sources (the build writes beside them) and installed without
    # extras, as `pip install cnn-serving` would.
    source = env_dir.parent / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("serving", "training"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(source)],
                   check=True, timeout=600, cwd=env_dir.parent)
    return python


def _run(python: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # Run from outside the checkout, so that the installed package (not the source tree) is imported.
    return subprocess.run([str(python), *args], capture_output=True, text=True, timeout=120, env=env,
                          cwd=cwd or python.parent)


def test_base_install_holds_no_runtime_and_is_small(client_python):
    probe = _run(client_python, "-c", textwrap.dedent("""
        import importlib.util, json
        print(json.dumps({m: importlib.util.find_spec(m) is not None
                          for m in ("onnxruntime", "PIL", "torch", "matplotlib", "grpc", "numpy", "serving")}))
    """))
    assert probe.returncode == 0, probe.stderr
    found = json.loads(probe.stdout)
    assert found == {"onnxruntime": False, "PIL": False, "torch": False, "matplotlib": False,
                     "grpc": True, "numpy": True, "serving": True}
    size = _size_mb(client_python.parent.parent)
    print(f"client virtualenv: {size:.0f} MB")
    assert size < CLIENT_VENV_LIMIT_MB


def test_base_install_says_which_extra_serves(client_python):
    result = _run(client_python, "-m", "serving", "serve", "--port", "0")
    assert result.returncode == 2
    assert "pip install 'cnn-serving[server]'" in result.stderr


def test_base_install_classifies_and_explains_against_a_real_server(client_python, server, tmp_path):
    png = tmp_path / "shoe.png"
    pixels = np.random.default_rng(0).integers(0, 256, (28, 28), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    png.write_bytes(buf.getvalue())

    classify = _run(client_python, "-m", "serving", "classify", "--server", server.address, "--json", str(png))
    assert classify.returncode == 0, classify.stderr
    predictions = json.loads(classify.stdout)["predictions"]
    assert len(predictions) == 5 and predictions[0]["label"].startswith("class_")  # the one top-k default

    explain = _run(client_python, "-m", "serving", "explain", "--server", server.address, "--out-dir",
                   str(tmp_path / "cams"), str(png))
    assert explain.returncode == 0, explain.stderr
    assert (tmp_path / "cams" / "shoe_cam.png").read_bytes().startswith(b"\x89PNG")

    index = _run(client_python, "-m", "serving", "repository", "index", "--server", server.address, "--json")
    assert index.returncode == 0, index.stderr
    assert {"name": "fmnist", "version": "1", "state": "READY", "reason": ""} in map(json.loads, index.stdout.splitlines())

    api = _run(client_python, "-c", textwrap.dedent(f"""
        import numpy as np
        from serving.client import AsyncClassifierClient, ClassifierClient
        with ClassifierClient("{server.address}") as client:
            top = client.classify([open("{png}", "rb").read()], top_k=2)[0]
            heat = client.explain([np.zeros((28, 28), np.uint8)])[0].heatmap
        print(top[0].label, len(top), heat.shape)
    """))
    assert api.returncode == 0, api.stderr
    label, k, shape = api.stdout.split(maxsplit=2)
    assert label == predictions[0]["label"] and k == "2" and shape.strip() == "(28, 28)"


def test_base_install_runs_a_batch_job_and_names_the_extra_for_pictures(client_python, server, tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (40, 28, 28), np.uint8)
    np.savez(tmp_path / "set.npz", images=images, labels=rng.integers(0, 10, 40))
    out = tmp_path / "preds.jsonl"
    job = _run(client_python, "-m", "serving", "batch", str(tmp_path / "set.npz"), "--server", server.address,
               "-o", str(out), "--batch-size", "16", "--no-progress")
    assert job.returncode == 0, job.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(str(i) for i in range(40))
    assert "cnn-serving[report]" in job.stderr  # no matplotlib or Pillow here: the rows, and the hint
    assert json.loads(Path(str(out) + ".summary.json").read_text())["images"] == 40
