"""`python -m serving batch` against the real server: IDX, npz, folder and list inputs, resuming, summary
accuracy against onnxruntime run directly on the model file, round robin over two replicas."""

from __future__ import annotations

import csv
import gzip
import json
import struct
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from serving.__main__ import main
from serving.jobs.sources import read_idx
from tests.conftest import LABELS, ramp_images, running_server

N_IMAGES = 300


def _write_idx(path: Path, array: np.ndarray) -> Path:
    raw = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


@pytest.fixture(scope="module")
def dataset() -> tuple[np.ndarray, np.ndarray]:
    return ramp_images(N_IMAGES, seed=0)


@pytest.fixture(scope="module")
def idx_pair(dataset, tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("idx")
    images, labels = dataset
    return _write_idx(d / "images-idx3-ubyte.gz", images), _write_idx(d / "labels-idx1-ubyte", labels)


def _offline_predictions(repo: Path, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(repo / "fmnist" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    x = (images / 255).astype(np.float32)[:, None]
    return session.run(["logits"], {session.get_inputs()[0].name: x})[0].argmax(1)


def _rows(path: Path) -> list[dict]:
    if path.suffix == ".csv":
        with path.open(newline="") as f:
            return list(csv.DictReader(f))
    return [json.loads(line) for line in path.read_text().splitlines()]


def _batch(*args: str | Path) -> int:
    return main(["batch", "--no-progress", *map(str, args)])


def test_read_idx_roundtrip(idx_pair, dataset):
    assert np.array_equal(read_idx(idx_pair[0]), dataset[0])
    assert np.array_equal(read_idx(idx_pair[1]), dataset[1])


def test_idx_interrupted_resumed_and_accurate(server, small_repo, idx_pair, dataset, tmp_path):
    images, labels = dataset
    out = tmp_path / "preds.jsonl"
    args = ["--idx-images", idx_pair[0], "--idx-labels", idx_pair[1], "--server", server.address, "-o", out,
            "--batch-size", 32, "--window", 2]
    assert _batch(*args, "--stop-after", 100) == 0
    assert len(_rows(out)) == 100
    assert not Path(f"{out}.summary.json").exists()  # no summary of a job that has not finished
    with out.open("a") as f:  # what a kill in the middle of a write leaves behind
        f.write('{"id":"150","labels":["cla')

    assert _batch(*args, "--top-k", 3) == 0
    rows = _rows(out)
    assert sorted(int(r["id"]) for r in rows) == list(range(N_IMAGES))  # every image exactly once
    assert all(len(r["labels"]) == len(r["scores"]) for r in rows)
    assert {r["true_label"] for r in rows} <= set(LABELS)

    offline = _offline_predictions(small_repo, images)
    by_id = {int(r["id"]): r for r in rows}
    served = np.array([LABELS.index(by_id[i]["labels"][0]) for i in range(N_IMAGES)])
    summary = json.loads(Path(f"{out}.summary.json").read_text())
    assert summary["images"] == summary["labeled"] == N_IMAGES
    assert summary["images_this_run"] == N_IMAGES - 100
    assert summary["accuracy"] == pytest.approx(float(np.mean(offline == labels)), abs=1e-12)
    assert np.array_equal(served, offline) and len(set(served.tolist())) > 1
    assert set(summary["per_class"]) == set(LABELS)
    assert np.array(summary["confusion_matrix"]).sum() == N_IMAGES
    assert Path(summary["confusion_png"]).stat().st_size > 0
    assert Image.open(summary["mistakes_png"]).size[0] > 0

    assert _batch(*args) == 0  # a finished job run again classifies nothing and writes nothing twice
    assert len(_rows(out)) == N_IMAGES


def test_npz_to_csv_with_cams(server, small_repo, dataset, tmp_path):
    images, labels = dataset[0][:40], dataset[1][:40]
    np.savez(tmp_path / "set.npz", images=images, labels=labels)
    out, cams = tmp_path / "preds.csv", tmp_path / "cams"
    assert _batch(tmp_path / "set.npz", "--server", server.address, "-o", out, "--cam-dir", cams,
                  "--batch-size", 16, "--top-k", 2) == 0
    rows = _rows(out)
    assert [r["id"] for r in rows] == [str(i) for i in range(40)] and rows[0]["label_2"]  # in order, CAMs or not
    assert len(list(cams.glob("*.png"))) == 40
    summary = json.loads(Path(f"{out}.summary.json").read_text())
    offline = _offline_predictions(small_repo, images)
    assert summary["accuracy"] == pytest.approx(float(np.mean(offline == labels)), abs=1e-12)


def test_folder_and_list_inputs(server, dataset, tmp_path):
    images = dataset[0]
    root = tmp_path / "pics"
    for n, cls in enumerate(["class_0", "class_3", "class_0", "class_3", "class_7"]):
        (root / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[n]).save(root / cls / f"{n}.png")
    Image.fromarray(images[9]).save(root / "loose.png")           # no class folder: no true label
    (root / "class_0" / "broken.png").write_bytes(b"not a png")    # fails alone; the rest of its request goes on
    out = tmp_path / "folder.jsonl"
    assert _batch(root, "--server", server.address, "-o", out, "--cam-dir", tmp_path / "cams",
                  "--cam-mistakes-only") == 0
    rows = {r["id"]: r for r in _rows(out)}
    assert len(rows) == 7
    assert "INVALID_ARGUMENT" in rows["class_0/broken.png"]["error"]
    assert rows["class_3/1.png"]["true_label"] == "class_3" and "true_label" not in rows["loose.png"]
    mistakes = [r for r in rows.values() if r.get("correct") is False]
    assert len(list((tmp_path / "cams").glob("*.png"))) == len(mistakes)
    summary = json.loads(Path(f"{out}.summary.json").read_text())
    assert (summary["errors"], summary["labeled"]) == (1, 5)

    listing = tmp_path / "list.csv"
    listing.write_text("path,label\npics/class_0/0.png,class_0\npics/class_3/1.png,3\npics/loose.png\n")
    assert _batch(listing, "--server", server.address, "-o", tmp_path / "list.jsonl") == 0
    rows = {r["id"]: r for r in _rows(tmp_path / "list.jsonl")}
    assert rows["pics/class_3/1.png"]["true_label"] == "class_3"  # an index in range is a class index
    assert len(rows) == 3 and "true_label" not in rows["pics/loose.png"]


def test_round_robin_over_two_servers_and_a_dead_one(small_repo, idx_pair, tmp_path):
    def served(s) -> float:
        return s.server.metrics.registry.get_sample_value("inference_requests_total",
                                                          {"model": "fmnist", "version": "1"}) or 0

    with running_server(small_repo) as a, running_server(small_repo) as b:
        out = tmp_path / "rr.jsonl"
        assert _batch("--idx-images", idx_pair[0], "--server", f"{a.address},{b.address}", "-o", out,
                      "--batch-size", 50) == 0
        assert (served(a), served(b)) == (3, 3)  # 6 requests dealt alternately
        assert len(_rows(out)) == N_IMAGES

        # A replica that cannot be reached hands its share to the live one; nothing is lost or doubled.
        out = tmp_path / "failover.jsonl"
        assert _batch("--idx-images", idx_pair[0], "--server", f"{a.address},127.0.0.1:1", "-o", out,
                      "--batch-size", 50, "--retries", 1) == 0
        assert sorted(int(r["id"]) for r in _rows(out)) == list(range(N_IMAGES))
        summary = json.loads(Path(f"{out}.summary.json").read_text())
        assert "127.0.0.1:1" in summary["servers_given_up"][0] and "accuracy" not in summary


def test_a_nan_score_is_written_as_null_and_read_back_for_the_report(tmp_path):
    """A model whose logits are not finite gives NaN scores: the row is still valid JSON, and resuming and
    ranking the mistakes take it."""
    from serving.jobs.output import Output
    from serving.jobs.report import worst_mistakes
    from serving.jobs.sources import Source
    rows = [{"id": "0", "labels": ["Coat", "Bag"], "scores": [float("nan"), 0.25], "true_label": "Bag",
             "correct": False},
            {"id": "1", "labels": ["Bag", "Coat"], "scores": [0.75, 0.25], "true_label": "Coat", "correct": False}]
    output = Output(tmp_path / "out.jsonl", top_k=2)
    output.open()
    output.append(rows)
    output.close()
    assert [json.loads(line)["scores"] for line in (tmp_path / "out.jsonl").read_text().splitlines()] == [
        [None, 0.25], [0.75, 0.25]]
    written = Output(tmp_path / "out.jsonl", top_k=2).resume()
    mistakes, positions = worst_mistakes(written, Source("test", ["0", "1"], pixels=np.zeros((2, 28, 28), np.uint8)))
    assert [m["id"] for m in mistakes] == ["1", "0"] and positions.tolist() == [1, 0]
