"""`python -m serving batch --engine ray` on a local Ray (a pool smaller than the CPU count): the same rows as
the gRPC engine against the real server, row by row; exactly once across an interruption; Parquet in and
out, with an image that cannot be decoded failing alone as it does through the server."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("ray")
pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

from serving.__main__ import main  # noqa: E402
from tests.conftest import LABELS, ramp_images  # noqa: E402

N_IMAGES = 240


@pytest.fixture(scope="module")
def dataset() -> tuple[np.ndarray, np.ndarray]:
    return ramp_images(N_IMAGES, seed=3)


def _rows(path: Path) -> dict[str, dict]:
    if path.suffix == ".parquet":
        table = pa.concat_tables([pq.read_table(p) for p in sorted(path.glob("part-*.parquet"))])
        rows = [{k: v for k, v in r.items() if v is not None} for r in table.to_pylist()]
    else:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
    by_id = {r["id"]: r for r in rows}
    assert len(by_id) == len(rows), "an image was written twice"
    return by_id


def _ray(*args) -> int:
    return main(["batch", "--engine", "ray", "--num-actors", "1", "--no-progress", *map(str, args)])


def test_ray_rows_equal_served_rows_and_resume_exactly_once(server, small_repo, dataset, tmp_path):
    images, labels = dataset
    np.savez(tmp_path / "set.npz", images=images, labels=labels)
    served = tmp_path / "served.jsonl"
    assert main(["batch", "--no-progress", str(tmp_path / "set.npz"), "--server", server.address, "-o", str(served),
                 "--batch-size", "32"]) == 0

    out = tmp_path / "ray.jsonl"
    common = [tmp_path / "set.npz", "--model-repository", small_repo, "-o", out, "--batch-size", 32]
    assert _ray(*common, "--stop-after", 100) == 0
    assert len(_rows(out)) == 100 and not Path(f"{out}.summary.json").exists()
    assert _ray(*common) == 0  # the interrupted job, run again, does only what is missing
    ray_rows, served_rows = _rows(out), _rows(served)
    assert len(ray_rows) == N_IMAGES
    assert ray_rows == served_rows  # ids, top-k labels, scores, true labels: the server's own answers
    assert len({r["labels"][0] for r in ray_rows.values()}) > 1

    summary = json.loads(Path(f"{out}.summary.json").read_text())
    served_summary = json.loads(Path(f"{served}.summary.json").read_text())
    assert summary["engine"] == "ray" and summary["images_this_run"] == N_IMAGES - 100
    assert summary["accuracy"] == served_summary["accuracy"] and summary["per_class"] == served_summary["per_class"]
    assert summary["images_per_second"] > 0 and summary["startup_seconds"] > 0
    assert Image.open(summary["mistakes_png"]).size[0] > 0


def test_parquet_in_and_out_with_a_broken_image(server, small_repo, dataset, tmp_path):
    images, labels = dataset
    encoded = []
    for image in images[:30]:
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        encoded.append(buf.getvalue())
    encoded[7] = b"not a png"
    table = pa.table({"id": [f"img-{i}" for i in range(30)], "image": encoded,
                      "label": [LABELS[i] for i in labels[:30]]})
    pq.write_table(table, tmp_path / "set.parquet")

    out = tmp_path / "ray.parquet"
    assert _ray(tmp_path / "set.parquet", "--model-repository", small_repo, "-o", out, "--batch-size", 8) == 0
    served = tmp_path / "served.jsonl"
    assert main(["batch", "--no-progress", str(tmp_path / "set.parquet"), "--server", server.address, "-o",
                 str(served), "--batch-size", "8"]) == 0
    ray_rows, served_rows = _rows(out), _rows(served)
    assert ray_rows == served_rows and len(ray_rows) == 30
    assert ray_rows["img-7"]["error"].startswith("INVALID_ARGUMENT: cannot decode image")
