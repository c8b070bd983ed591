"""`python -m serving batch --engine ray` on a local Ray: the same rows as the gRPC engine against the real
server, row by row; exactly once across an interruption (one actor, then the default pool of an actor per
CPU); Parquet in and out, with an image that cannot be decoded failing alone as it does through the server;
a pool the machine cannot hold refused with the reason; an output of another model refused, then started
afresh; pixels at the model size taken whole and others resized; and how the pool and its blocks are sized."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("ray")
pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

from serving.__main__ import main  # noqa: E402
from serving.engine.inference import InferenceRequest, RawTensor  # noqa: E402
from serving.engine.loading import load_execution  # noqa: E402
from serving.engine.runtime import RuntimeOptions  # noqa: E402
from serving.jobs import ray_engine  # noqa: E402
from serving.jobs.sources import Source  # noqa: E402
from tests.conftest import LABELS, export_small, ramp_images  # noqa: E402

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


def _ray(*args, actors: int = 1) -> int:
    return main(["batch", "--engine", "ray", "--num-actors", str(actors), "--no-progress", *map(str, args)])


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
    assert _ray(*common, actors=0) == 0  # the interrupted job, run again (default pool), does only what is missing
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


def test_a_pool_the_machine_cannot_hold_is_refused_with_the_reason(small_repo, dataset, tmp_path, capsys):
    images, labels = dataset
    np.savez(tmp_path / "set.npz", images=images, labels=labels)
    too_many = (os.cpu_count() or 1) + 1
    assert _ray(tmp_path / "set.npz", "--model-repository", small_repo, "-o", tmp_path / "out.jsonl",
                actors=too_many) == 1
    err = capsys.readouterr().err
    assert f"cannot hold {too_many} actor(s) of 1 CPU(s)" in err and "--num-actors" in err
    assert main(["batch", "--engine", "ray", "--threads-per-actor", "0", str(tmp_path / "set.npz")]) == 2


def test_an_output_of_another_model_is_refused_before_ray_starts_and_fresh_starts_over(server, small_repo, dataset,
                                                                                      tmp_path, capsys):
    """The Ray engine checks an output's model version as the gRPC engine does (one check in `output.py`):
    an output the gRPC engine began with fmnist is refused to another model of the repository, resumed on Ray
    by fmnist (the same model version, through either engine), and started afresh with the other model."""
    images, labels = dataset
    np.savez(tmp_path / "set.npz", images=images, labels=labels)
    repo = tmp_path / "repo"
    shutil.copytree(small_repo / "fmnist", repo / "fmnist")
    export_small(repo, "other", seed=1)
    out = tmp_path / "preds.jsonl"
    assert main(["batch", "--no-progress", str(tmp_path / "set.npz"), "--server", server.address, "-o", str(out),
                 "--stop-after", "100"]) == 0
    written = out.read_bytes()
    capsys.readouterr()

    ray_job = [tmp_path / "set.npz", "--model-repository", repo, "--model", "other", "-o", out, "--batch-size", 32]
    assert _ray(*ray_job) == 2
    err = capsys.readouterr().err
    assert f"{out} was written with fmnist v1, not other v1" in err and "--fresh" in err
    assert err.count("\n") == 1 and out.read_bytes() == written  # one line, and the output untouched

    assert _ray(*[a if a != "other" else "fmnist" for a in ray_job]) == 0
    summary = json.loads(Path(f"{out}.summary.json").read_text())
    assert (summary["model"], summary["images_this_run"], summary["images"]) == ("fmnist", N_IMAGES - 100, N_IMAGES)

    assert _ray(*ray_job, "--fresh") == 0
    summary = json.loads(Path(f"{out}.summary.json").read_text())
    assert (summary["model"], summary["versions"], summary["images_this_run"]) == ("other", [1], N_IMAGES)
    assert json.loads(Path(f"{out}.job.json").read_text()) == {"model": "other", "version": 1}
    assert len(_rows(out)) == N_IMAGES


def test_an_actor_classifies_pixels_at_the_model_size_and_resizes_others_as_a_server_does(small_repo, dataset):
    images, _ = dataset
    spec, version = ray_engine.choose_model(Path(small_repo), "")
    actor = ray_engine.Classifier(str(Path(small_repo).resolve()), spec.name, version, top_k=3, threads=1,
                                  device="cpu", batch_size=16)
    at_size = actor({"position": np.arange(16), "pixels": images[:16]})
    loaded = load_execution(spec, version, RuntimeOptions(device="cpu"), instances=1)
    one_by_one = loaded.execution.execute([InferenceRequest([RawTensor(im.shape, "uint8", im.tobytes())])
                                           for im in images[:16]])
    np.testing.assert_array_equal(at_size["top_index"], np.concatenate([r.ranking[:, :3] for r in one_by_one]))

    doubled = np.repeat(np.repeat(images[:20], 2, axis=1), 2, axis=2)  # 56x56: resized, image by image
    out = actor({"position": np.arange(20), "pixels": doubled})
    assert (out["error_status"] == "").all() and out["top_index"].shape == (20, 3)
    assert (out["top_score"][:, 0] >= out["top_score"][:, 1]).all()


def test_pool_size_by_default_an_actor_per_cpu_or_per_gpu_share():
    assert ray_engine.pool_size({"CPU": 4.0}, 0, 1, 0) == 4
    assert ray_engine.pool_size({"CPU": 4.0}, 0, 2, 0) == 2
    assert ray_engine.pool_size({"CPU": 1.0}, 0, 2, 0) == 1  # never an empty pool
    assert ray_engine.pool_size({"CPU": 16.0, "GPU": 2.0}, 0, 1, 1) == 2
    assert ray_engine.pool_size({"CPU": 16.0, "GPU": 1.0}, 0, 1, 0.5) == 2
    assert ray_engine.pool_size({"CPU": 16.0}, 3, 1, 0) == 3  # asked for: as asked


def test_blocks_are_whole_batches_bounded_and_even_over_the_actors():
    def sizes(source, images, batch_size, actors):
        bounds = ray_engine.block_bounds(source, images, batch_size, actors)
        assert bounds[0][0] == 0 and bounds[-1][1] == images  # every image once, in order
        assert all(stop == start for (_, stop), (start, _) in zip(bounds, bounds[1:]))
        assert all(start % batch_size == 0 for start, _ in bounds)  # whole batches
        return [stop - start for start, stop in bounds]

    pixels = Source("set", [], pixels=np.zeros((1, 28, 28), np.uint8))
    small = sizes(pixels, 10_000, 64, 2)
    assert len(small) == 2 * ray_engine.BLOCKS_PER_ACTOR and max(small) - min(small) < 2 * 64  # a batch apart, the last short
    large = sizes(pixels, 60_000, 64, 2)  # 15 blocks would fit MAX_BLOCK_IMAGES; 16 share it over 2 actors
    assert len(large) == 16 and max(large) <= ray_engine.MAX_BLOCK_IMAGES and max(large) - min(large) < 2 * 64
    assert sizes(pixels, 10, 64, 2) == [10]  # one batch: one block
    assert len(sizes(pixels, 1000, 64, 3)) == 9
    big = Source("set", [], pixels=np.zeros((1, 2048, 2048, 3), np.uint8))  # 12 MiB an image
    assert max(sizes(big, 1000, 2, 2)) == 4  # at most 64 MiB of pixels, in whole batches
    files = Source("set", [], files=[Path("a.png")])
    assert max(sizes(files, 100_000, 64, 2)) <= ray_engine.MAX_BLOCK_IMAGES
