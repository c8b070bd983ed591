"""The client's commands as a user runs them: a subprocess against the real server, its exit code, stdout and
stderr. A user's mistake is one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from serving.client import ClassifierClient, InvalidArgument, NotFound, StreamResult, Unavailable
from tests.cli_run import error_without_traceback, run_module
from tests.conftest import LABELS, ramp_images

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_module("serving", *args, env=env, timeout=120)


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pictures")
    for i, image in enumerate(ramp_images(3, seed=5)[0]):
        (folder / f"img{i}.png").write_bytes(png(image))
    return folder


def test_classify_a_missing_file_is_one_line(server):
    result = cli("classify", "--server", server.address, "nonexist.png")
    assert error_without_traceback(result).strip() == "error: nonexist.png: no such file or folder"


def test_classify_a_folder_classifies_its_images(server, pictures):
    result = cli("classify", "--server", server.address, "--json", pictures)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [Path(r["file"]).name for r in rows] == ["img0.png", "img1.png", "img2.png"]
    assert all(len(r["predictions"]) == 5 for r in rows)  # one top-k default everywhere: the API's 5


def test_one_bad_image_among_several_is_named_and_the_others_answered(server, pictures, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    result = cli("classify", "--server", server.address, pictures / "img0.png", bad, pictures / "img1.png")
    stderr = error_without_traceback(result)
    assert stderr.startswith(f"error: {bad}: INVALID_ARGUMENT") and len(stderr.splitlines()) == 1
    answered = result.stdout.splitlines()
    assert [line.split(":")[0] for line in answered] == [str(pictures / "img0.png"), str(pictures / "img1.png")]


def test_top_k_zero_is_refused(server, pictures):
    result = cli("classify", "--server", server.address, "--top-k", "0", pictures)
    assert "--top-k: must be at least 1" in error_without_traceback(result)


def test_a_model_version_flag_reaches_the_server(server, pictures):
    assert cli("classify", "--server", server.address, "--model-version", "1", pictures).returncode == 0
    result = cli("classify", "--server", server.address, "--model-version", "7", pictures)
    assert "NOT_FOUND" in error_without_traceback(result, code=1)  # the server's answer, in one line


def test_server_variables_do_not_touch_client_commands(server, pictures):
    """CNN_SERVING_PORT is serve's; a client command run in the same environment ignores it."""
    result = cli("classify", "--server", server.address, pictures, env={"CNN_SERVING_PORT": "abc"})
    assert result.returncode == 0, result.stderr
    refused = cli("serve", env={"CNN_SERVING_PORT": "abc"})
    assert "CNN_SERVING_PORT='abc' is not a valid int" in error_without_traceback(refused).splitlines()[-1]


def test_explain_by_class_name_writes_overlay_and_raw_heatmap(server, pictures, tmp_path):
    out = tmp_path / "cams"
    result = cli("explain", "--server", server.address, "--target-class", "CLASS_3", "--out-dir", out,
                 pictures / "img0.png")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["img0_cam.npy", "img0_cam.png"]  # never .png.png
    heatmap = np.load(out / "img0_cam.npy")
    assert heatmap.shape == (28, 28) and heatmap.dtype == np.float32
    assert f"{LABELS[3]} (" in result.stdout
    typo = cli("explain", "--server", server.address, "--target-class", "clas_3", "--out-dir", out,
               pictures / "img0.png")
    assert "did you mean 'class_3'" in error_without_traceback(typo)


def test_models_health_and_repository_speak_json(server):
    models = json.loads(cli("models", "--server", server.address, "--json").stdout)
    assert models["name"] == "fmnist" and models["metrics"]["test_acc"] == 0.5 and models["supports_cam"]
    index = json.loads(cli("repository", "index", "--server", server.address, "--json").stdout.splitlines()[0])
    assert index["name"] == "fmnist" and index["state"] == "READY"
    health = cli("health", "--server", f"{server.address},127.0.0.1:1", "--json", "--timeout", "1")
    rows = [json.loads(line) for line in health.stdout.splitlines()]
    assert [r["status"] for r in rows] == ["SERVING", "UNAVAILABLE"]
    assert health.returncode == 1  # not every server serves
    assert cli("health", "--server", server.address).returncode == 0


def test_cnn_serve_help_names_itself(tmp_path):
    """The installed script's help says `cnn-serve`, not `python -m serving`."""
    script = tmp_path / "cnn-serve"
    script.write_text(f"#!{sys.executable}\nimport sys\nfrom serving.__main__ import main\nsys.exit(main())\n")
    script.chmod(0o755)
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.stdout.startswith("usage: cnn-serve")


def test_serve_help_shows_defaults():
    text = cli("serve", "--help").stdout
    assert "(default: 8001)" in text and "(default: 30.0)" in text
    assert "--log-level {DEBUG,INFO,WARNING,ERROR}" in text and "execution provider" in text


def test_client_errors_are_typed(server):
    with ClassifierClient(server.address, retries=0) as client:
        with pytest.raises(NotFound) as missing:
            client.classify([np.zeros((28, 28), np.uint8)], model="no_such_model")
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND and isinstance(missing.value, grpc.RpcError)
        with pytest.raises(InvalidArgument):
            client.classify([b"junk"])
        answers = list(client.classify_stream([("a", [np.zeros((28, 28), np.uint8)]), ("b", [b"junk"])]))
    assert all(isinstance(a, StreamResult) for a in answers)
    assert answers[0].ok and answers[0].predictions[0][0].label in LABELS and answers[0].version == 1
    assert isinstance(answers[1].error, InvalidArgument)
    with ClassifierClient("127.0.0.1:1", retries=0, timeout_s=1) as nowhere, pytest.raises(Unavailable):
        nowhere.list_models()


def test_exif_orientation_is_applied_by_the_server(server):
    """A JPEG stored sideways with orientation 6 classifies as the upright image it shows."""
    upright = ramp_images(1, seed=11)[0][0]
    stored = np.rot90(upright, k=1)  # orientation 6 means: turn 90 degrees clockwise to display
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(stored)).save(buf, format="JPEG", quality=100, exif=exif)
    with ClassifierClient(server.address) as client:
        [expected] = client.explain([png(upright)])
        [got] = client.explain([buf.getvalue()])
        [sideways] = client.explain([png(np.ascontiguousarray(stored))])
    # JPEG loses a little, so compare: the tagged JPEG's map is the upright image's, not the one an EXIF-blind
    # decoder would give (the stored, sideways pixels).
    upright_gap = np.abs(got.heatmap - expected.heatmap).mean()
    blind_gap = np.abs(got.heatmap - sideways.heatmap).mean()
    assert upright_gap < 0.05 and blind_gap > 4 * upright_gap
    # The client re-encodes a PIL image as PNG, which has no orientation tag: it turns the image upright first.
    with ClassifierClient(server.address) as client:
        [from_pil] = client.explain([Image.open(io.BytesIO(buf.getvalue()))])
    assert np.abs(from_pil.heatmap - got.heatmap).max() < 1e-6


def test_a_default_model_answers_calls_that_name_none(tmp_path):
    """With two models, a call without --model is refused unless the server has a default model."""
    from tests.conftest import export_small, running_server

    export_small(tmp_path, "shirts")
    export_small(tmp_path, "shoes", seed=1)
    image = np.zeros((28, 28), np.uint8)
    with running_server(tmp_path) as server, ClassifierClient(server.address, retries=0) as client:
        with pytest.raises(InvalidArgument, match="--default-model"):
            client.classify([image])
    with running_server(tmp_path, default_model="shoes") as server, ClassifierClient(server.address) as client:
        assert client.get_model().name == "shoes"
        assert client.classify([image]) == client.classify([image], model="shoes")
    assert "--default-model" in cli("serve", "--help").stdout
