"""`python -m serving batch` against the real server: IDX, npz, folder and list inputs, resuming, summary
accuracy against onnxruntime run directly on the model file, round robin over two replicas."""

from __future__ import annotations

import concurrent.futures
import csv
import gzip
import json
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from serving.__main__ import main
from serving.jobs.sources import read_idx
from tests.conftest import LABELS, export_small, ramp_images, running_server

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


def _offline_accuracy(repo: Path, model: str, version: int, images: np.ndarray, labels: np.ndarray) -> float:
    session = ort.InferenceSession(str(repo / model / str(version) / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {session.get_inputs()[0].name: (images / 255).astype(np.float32)[:, None]})[0]
    return float(np.mean(logits.argmax(1) == labels))


def test_an_output_written_with_another_model_is_refused_unless_fresh(idx_pair, dataset, tmp_path, capsys):
    """The resume of finding 7: an output written with one model, run again with another, was taken as done
    and summarised as the other's. It is refused now with the reason; --fresh starts it over."""
    repo = tmp_path / "repo"
    export_small(repo, "fmnist", seed=0)
    export_small(repo, "other", seed=1)
    images, labels = dataset
    out = tmp_path / "preds.jsonl"
    job = ["--idx-images", idx_pair[0], "--idx-labels", idx_pair[1], "-o", out, "--batch-size", 50]
    with running_server(repo) as server:
        job += ["--server", server.address]
        assert _batch(*job, "--model", "fmnist", "--stop-after", 100) == 0
        assert json.loads(Path(f"{out}.job.json").read_text()) == {"model": "fmnist", "version": 1}
        written = out.read_bytes()
        capsys.readouterr()

        assert _batch(*job, "--model", "other") == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err  # one line, no traceback
        assert f"{out} was written with fmnist v1, not other v1" in err and "--fresh" in err
        assert out.read_bytes() == written and not Path(f"{out}.summary.json").exists()  # nothing touched

        assert _batch(*job, "--model", "fmnist") == 0  # the same model resumes as before
        summary = json.loads(Path(f"{out}.summary.json").read_text())
        assert (summary["model"], summary["versions"], summary["images_this_run"]) == ("fmnist", [1], N_IMAGES - 100)
        assert summary["accuracy"] == pytest.approx(_offline_accuracy(repo, "fmnist", 1, images, labels), abs=1e-12)

        assert _batch(*job, "--model", "other", "--fresh") == 0
        assert "discarded the rows of fmnist v1 (--fresh)" in capsys.readouterr().err
        summary = json.loads(Path(f"{out}.summary.json").read_text())
        assert (summary["model"], summary["images"], summary["images_this_run"]) == ("other", N_IMAGES, N_IMAGES)
        other_accuracy = _offline_accuracy(repo, "other", 1, images, labels)
        assert summary["accuracy"] == pytest.approx(other_accuracy, abs=1e-12)
        assert other_accuracy != _offline_accuracy(repo, "fmnist", 1, images, labels)  # the two models differ here
        assert sorted(int(r["id"]) for r in _rows(out)) == list(range(N_IMAGES))
        assert json.loads(Path(f"{out}.job.json").read_text()) == {"model": "other", "version": 1}


def test_the_model_served_without_a_name_counts_by_its_resolved_name_and_version(idx_pair, tmp_path, capsys):
    """A job naming no model takes the server's only one; a new version served between two runs is another
    model version, refused like another model. So are rows that record no model (an output of an earlier
    release), and a bad record."""
    repo = tmp_path / "repo"
    export_small(repo, "fmnist", seed=0)
    out = tmp_path / "preds.csv"
    job = ["--idx-images", idx_pair[0], "--idx-labels", idx_pair[1], "-o", out, "--batch-size", 50]
    with running_server(repo) as server:
        job += ["--server", server.address]
        assert _batch(*job, "--stop-after", 100) == 0
        assert json.loads(Path(f"{out}.job.json").read_text()) == {"model": "fmnist", "version": 1}

        export_small(repo, "fmnist", version=2, seed=1)
        server.call(server.server.repository.poll_once())  # the server now serves version 2 only
        capsys.readouterr()
        assert _batch(*job) == 2
        assert f"{out} was written with fmnist v1, not fmnist v2" in capsys.readouterr().err
        assert len(_rows(out)) == 100

        Path(f"{out}.job.json").unlink()  # rows that record no model
        assert _batch(*job) == 2
        assert "no record of the model that wrote them" in capsys.readouterr().err
        Path(f"{out}.job.json").write_text("{not json")
        assert _batch(*job) == 1 and "is not a record of a model and version" in capsys.readouterr().err

        assert _batch(*job, "--fresh") == 0
        summary = json.loads(Path(f"{out}.summary.json").read_text())
        assert (summary["model"], summary["versions"], summary["images_this_run"]) == ("fmnist", [2], N_IMAGES)
        assert len(_rows(out)) == N_IMAGES


def test_a_version_swapped_in_mid_job_stops_it_before_the_rows_mix(idx_pair, tmp_path, capsys):
    """Every request of a job names the version it started with: when the server swaps versions under it, the
    job stops with the reason instead of writing the new version's answers into the old version's output."""
    repo = tmp_path / "repo"
    export_small(repo, "fmnist", seed=0)
    staged = export_small(tmp_path / "staged", "fmnist", version=2, seed=1)
    out = tmp_path / "preds.jsonl"
    # Each one-image request waits out a 20 ms batching delay, so the job lasts seconds and the swap lands in it.
    slow = {"max_queue_delay_us": 20_000, "inline_budget_us": 0}
    with running_server(repo, batching_overrides=slow) as server:
        job = ["--idx-images", idx_pair[0], "--server", server.address, "-o", out, "--batch-size", 1,
               "--window", 1]
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            running = pool.submit(_batch, *job)
            deadline = time.monotonic() + 60
            while (not out.exists() or out.read_text().count("\n") < 20) and time.monotonic() < deadline:
                time.sleep(0.01)
            shutil.copytree(staged, repo / "fmnist" / "2")
            server.call(server.server.repository.poll_once())  # version 2 in, version 1 retired
            assert running.result(120) == 1
        err = capsys.readouterr().err
        assert "NOT_FOUND" in err and "the output holds fmnist v1's rows" in err and "--fresh" in err
        assert 20 <= len(_rows(out)) < N_IMAGES
        assert _batch(*job) == 2  # resuming with the version served now is refused, as another model would be


def test_a_parquet_output_records_its_model_and_fresh_removes_only_the_jobs_files(tmp_path, capsys):
    """The record and --fresh work alike for the Parquet folder: its part files go, anything else put in the
    folder stays."""
    pytest.importorskip("pyarrow")
    from serving.jobs.errors import OutputOfAnotherModel
    from serving.jobs.output import Output, WrittenWith
    path = tmp_path / "preds.parquet"
    first, second = WrittenWith("fmnist", 1), WrittenWith("fmnist", 2)
    output = Output(path, top_k=2)
    assert output.begin(first) == []
    output.open()
    output.append([{"id": "0", "labels": ["a", "b"], "scores": [0.75, 0.25]}])
    output.close()
    (path / "README.txt").write_text("not the job's")
    Path(f"{path}.summary.json").write_text("{}")

    assert [r["id"] for r in Output(path, top_k=2).begin(first)] == ["0"]  # the same version resumes
    with pytest.raises(OutputOfAnotherModel, match="written with fmnist v1, not fmnist v2") as refused:
        Output(path, top_k=2).begin(second)
    assert refused.value.exit_code == 2 and len(list(path.glob("part-*.parquet"))) == 1

    assert Output(path, top_k=2).begin(second, fresh=True) == []
    assert not list(path.glob("part-*.parquet")) and (path / "README.txt").exists()
    assert not Path(f"{path}.summary.json").exists()
    assert Output(path, top_k=2).recorded() == second
