"""The Ray engine of batch jobs: the data set as a Ray Dataset, classified by a pool of actors that each load
one model version with the server's own code (repository format, onnxruntime sessions, batch execution:
decode -> one run -> probabilities and ranking), next to the data, with no server in between.

    python -m serving batch --engine ray --idx-images t10k-images-idx3-ubyte.gz --idx-labels ... -o preds.jsonl
    python -m serving batch --engine ray images.parquet --ray-address auto --num-actors 8 --gpus-per-actor 1

The rows are the gRPC engine's (same ids, top-k, scores and true labels: `rows.py` builds them for both),
written by the driver as batches come back, so an interrupted job resumes the same way: ids already in the
output are skipped. The driver lists the input (ids, labels, and the pixels or bytes of in-memory inputs);
image files are read by the actors, so the files and the model repository must be readable by every node.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..repository_format import BUNDLED_REPOSITORY, CONFIG_FILE, ModelSpec, list_versions, load_spec, select_versions
from .errors import BatchError
from .output import Output
from .report import finish_report, summarize, unfinished, worst_mistakes
from .rows import Truth, error_row, positions_to_do, prediction_rows
from .sources import Source, open_source, resolve_labels

RAY_EXTRA_HINT = "the Ray engine needs Ray: pip install 'cnn-serving[ray]'"
# Blocks of up to 16 batches and 64 MiB: each block is one task on an actor, and a task costs Ray tens of
# milliseconds on top of its batches (measured here: 4 batches a block reached 0.62 of in-process
# onnxruntime, 16 reached 0.8), while a block must stay small enough to stream.
BATCHES_PER_BLOCK = 16
MAX_BLOCK_BYTES = 64 << 20


def choose_model(repository: Path, model: str) -> tuple[ModelSpec, int]:
    """The named model (or the repository's only one) at the newest version its version policy serves."""
    if not repository.is_dir():
        raise BatchError(f"model repository {repository} is not a directory")
    names = sorted(p.name for p in repository.iterdir() if (p / CONFIG_FILE).exists())
    if not model:
        if len(names) != 1:
            raise BatchError(f"{repository} holds {', '.join(names) or 'no models'}; choose one with --model")
        model = names[0]
    if model not in names:
        raise BatchError(f"model {model!r} is not in {repository} (models: {', '.join(names) or 'none'})")
    spec = load_spec(repository / model)
    versions = select_versions(spec.config, list_versions(spec.directory))
    if not versions:
        raise BatchError(f"model {model!r} has no version directory with a model file in {repository}")
    return spec, versions[-1]


class Classifier:
    """The actor: one model version, loaded once with the server's code; one call per batch of rows.

    The batch goes to the execution as one request (decoded into one buffer, run once). When an image in
    it cannot be decoded, the batch is sent again image by image, as the gRPC engine resends a failed
    request, so that image fails alone with the status name the server would answer.
    """

    def __init__(self, repository: str, model: str, version: int, top_k: int, threads: int, device: str):
        from ..server.model import load_execution
        from ..server.runtime import RuntimeOptions
        spec = load_spec(Path(repository) / model)
        # Spinning threads: an actor does nothing but run batches back to back (a server shares its cores).
        options = RuntimeOptions(device=device, intra_op_threads=threads, spin_wait=True)
        self.execution = load_execution(spec, version, options, instances=1).execution
        self.top_k = top_k

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        called_at = time.time()  # wall clock: the driver compares it with its own (one machine, or synced ones)
        from ..server.api.status import status_of
        from ..server.inference import InferenceRequest
        column = next(batch[name] for name in ("pixels", "path", "encoded") if name in batch)
        images = [_wire_image(item) for item in column]
        n, k = len(images), self.top_k
        top_index, top_score = np.zeros((n, k), np.int64), np.zeros((n, k), np.float32)
        status, message = np.full(n, "", object), np.full(n, "", object)
        (whole,) = self.execution.execute([InferenceRequest(images)])
        if not isinstance(whole, Exception):
            top_index[:], top_score[:] = whole.ranking[:, :k], whole.ranked_probabilities[:, :k]
        else:
            for j, result in enumerate(self.execution.execute([InferenceRequest([image]) for image in images])):
                if isinstance(result, Exception):
                    code, text = status_of(result)
                    status[j], message[j] = code.name, text
                else:
                    top_index[j], top_score[j] = result.ranking[0, :k], result.ranked_probabilities[0, :k]
        return {"position": batch["position"], "top_index": top_index, "top_score": top_score,
                "error_status": status, "error_message": message, "called_at": np.full(n, called_at)}


def _wire_image(stored):
    """An input as it is stored (uint8 pixels, a file path, encoded bytes) in the form a server receives it:
    pixels as a raw uint8 tensor, a file's bytes as an encoded image."""
    from ..server.inference import RawTensor
    if isinstance(stored, np.ndarray):
        return RawTensor(stored.shape, "uint8", stored.tobytes())
    if isinstance(stored, bytes):
        return stored
    return Path(stored).read_bytes()


@dataclass
class RayRun:
    images: int = 0
    seconds: float = 0.0          # from the first actor call to the last row written: start-up excluded
    startup_seconds: float = 0.0  # Ray, the actors and loading their models, until the first call
    actors: int = 0
    threads_per_actor: int = 0

    @property
    def images_per_second(self) -> float | None:
        return round(self.images / self.seconds, 1) if self.seconds > 0 else None


def _dataset(ray, source: Source, todo: np.ndarray, batch_size: int):
    """The images to classify as a Ray Dataset of several blocks: positions, and the pixels, file paths or
    encoded bytes of each."""
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray
    block = batch_size * BATCHES_PER_BLOCK
    if source.pixels is not None:  # in whole batches, at most MAX_BLOCK_BYTES of pixels
        per_batch = max(1, batch_size * int(np.prod(source.pixels.shape[1:])))
        block = batch_size * max(1, min(BATCHES_PER_BLOCK, MAX_BLOCK_BYTES // per_batch))
    tables = []
    for start in range(0, len(todo), block):
        positions = todo[start:start + block]
        columns: dict = {"position": pa.array(positions, pa.int64())}
        if source.pixels is not None:
            columns["pixels"] = ArrowTensorArray.from_numpy(np.ascontiguousarray(source.pixels[positions]))
        elif source.files is not None:
            columns["path"] = pa.array([str(source.files[p]) for p in positions.tolist()])
        else:
            columns["encoded"] = pa.array(source.images(positions), pa.binary())
        tables.append(pa.table(columns))
    return ray.data.from_arrow(tables)


def classify(args: argparse.Namespace, source: Source, spec: ModelSpec, version: int, todo: np.ndarray,
             top_k: int, truth: Truth, output: Output, progress) -> RayRun:
    try:
        import ray
    except ImportError:
        raise BatchError(RAY_EXTRA_HINT) from None
    started_at = time.time()
    local = not args.ray_address
    _start_ray(ray, args.ray_address, os.cpu_count() if local else None)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False  # ours counts rows written
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # its plan and timing lines, at every run
        cpus = int(ray.cluster_resources().get("CPU", 1))
        # One CPU stays free for Ray Data's read tasks: a pool that takes every CPU deadlocks them.
        actors = args.num_actors or max(1, cpus - 1)
        threads = args.threads_per_actor or max(1, (os.cpu_count() or 1) // actors if local else 1)
        run = RayRun(actors=actors, threads_per_actor=threads)
        device = "cuda" if args.gpus_per_actor else "cpu"
        classified = _dataset(ray, source, todo, args.batch_size).map_batches(
            Classifier, fn_constructor_kwargs=dict(repository=str(spec.directory.parent.resolve()), model=spec.name,
                                                   version=version, top_k=top_k, threads=threads, device=device),
            batch_size=args.batch_size, compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1,
            num_gpus=args.gpus_per_actor or None, batch_format="numpy")
        first_call = None
        for batch in classified.iter_batches(batch_size=None, batch_format="numpy"):
            called = float(batch["called_at"].min())
            first_call = called if first_call is None else min(first_call, called)
            rows = _rows(source, spec, truth, batch)
            output.append(rows)
            run.images += len(rows)
            progress.update(len(rows))
        if first_call is not None:
            run.startup_seconds = first_call - started_at
            run.seconds = time.time() - first_call
        return run
    finally:
        ray.shutdown()


def _start_ray(ray, address: str, cpus: int | None, attempts: int = 3) -> None:
    """Join the cluster, or start a local Ray. A local node on a busy machine sometimes misses Ray's start-up
    deadline (seen here while the previous job's node was still shutting down): it is tried again."""
    for attempt in range(1, attempts + 1):
        try:
            ray.init(address=address or None, num_cpus=cpus, include_dashboard=False, log_to_driver=False,
                     logging_level="WARNING", configure_logging=True)
            return
        except Exception as e:  # noqa: BLE001 - Ray raises a plain Exception for this
            if address or "timed out during startup" not in str(e) or attempt == attempts:
                raise
            print(f"the local Ray node did not start in time; trying again ({attempt}/{attempts - 1})", file=sys.stderr)
            ray.shutdown()
            time.sleep(2 * attempt)


def _rows(source: Source, spec: ModelSpec, truth: Truth, batch: dict[str, np.ndarray]) -> list[dict]:
    ok = batch["error_status"] == ""
    positions = batch["position"][ok]
    labels = [[spec.labels[i] for i in row] for row in batch["top_index"][ok].tolist()]
    rows, _ = prediction_rows(source, positions, labels, batch["top_score"][ok].tolist(),
                              batch["top_index"][ok, 0], truth)
    for position, status, message in zip(batch["position"][~ok].tolist(), batch["error_status"][~ok].tolist(),
                                         batch["error_message"][~ok].tolist(), strict=True):
        rows.append(error_row(source, position, status, message))
    return rows


def _mistake_overlays(spec: ModelSpec, version: int, source: Source, positions: np.ndarray) -> list:
    """CAM overlays of the mistakes, computed in the driver with the same code (the inputs themselves when
    the model cannot explain)."""
    from ..server.cam import overlay_png
    from ..server.inference import InferenceRequest
    from ..server.model import load_execution
    from ..server.preprocess import input_image_uint8
    from ..server.runtime import RuntimeOptions
    pictures = [source.picture(int(p)) for p in positions]
    if not pictures:
        return pictures
    loaded = load_execution(spec, version, RuntimeOptions(device="cpu"), instances=1)
    if loaded.cam_reason:
        return pictures
    request = InferenceRequest([_wire_image(p) for p in pictures], cam=True, keep_inputs=True)
    (result,) = loaded.execution.execute([request])
    if isinstance(result, Exception):
        return pictures
    return [overlay_png(input_image_uint8(x), heat) for x, heat in zip(result.inputs, result.cams, strict=True)]


def run_job(args: argparse.Namespace) -> int:
    if args.cam_dir:
        raise BatchError("--cam-dir is for the gRPC engine; the Ray engine writes rows and the summary")
    source = open_source(args)
    spec, version = choose_model(Path(args.model_repository or BUNDLED_REPOSITORY), args.model)
    top_k = max(1, min(args.top_k, spec.num_classes))
    output = Output(args.output, top_k)
    todo, already = positions_to_do(source, output.resume(), args.stop_after)
    truth = Truth(*resolve_labels(source.labels, spec.labels))
    print(f"{source.description}: {len(source)} images, {already} done already, {len(todo)} to classify with "
          f"{spec.name} v{version} on Ray", file=sys.stderr)
    from tqdm import tqdm
    output.open()
    try:
        with tqdm(total=len(source), initial=already, unit="img", disable=args.no_progress, smoothing=0.1,
                  dynamic_ncols=True) as progress:
            run = classify(args, source, spec, version, todo, top_k, truth, output, progress) if len(todo) else RayRun()
    finally:
        output.close()
    rows = output.resume()
    if unfinished(rows, source):
        return 0
    summary = {"input": source.description, "output": str(output.path), "model": spec.name, "versions": [version],
               "engine": "ray", "actors": run.actors, "threads_per_actor": run.threads_per_actor,
               **summarize(rows, spec.labels), "images_this_run": run.images, "seconds": round(run.seconds, 3),
               "startup_seconds": round(run.startup_seconds, 3),
               "images_per_second": run.images_per_second}
    mistakes, positions = worst_mistakes(rows, source, args.sheet_size)
    finish_report(summary, spec.labels, spec.name, str(output.path), mistakes,
                  _mistake_overlays(spec, version, source, positions))
    return 0
