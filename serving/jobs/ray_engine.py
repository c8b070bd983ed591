"""The Ray engine of batch jobs: the data set as a Ray Dataset, classified by a pool of actors that each load
one model version with the server's own code (repository format, onnxruntime sessions, batch execution:
decode -> one run -> probabilities and ranking), next to the data, with no server in between.

    python -m serving batch --engine ray --idx-images t10k-images-idx3-ubyte.gz --idx-labels ... -o preds.jsonl
    python -m serving batch --engine ray images.parquet --ray-address auto --num-actors 8 --gpus-per-actor 1

The rows are the gRPC engine's (same ids, top-k, scores and true labels: `rows.py` builds them for both),
written by the driver as batches come back, so an interrupted job resumes the same way: ids already in the
output are skipped, and an output written with another model or version is refused (`output.py`). The
driver lists the input (ids, labels, and the pixels or bytes of in-memory inputs); image files are read by
the actors, so the files and the model repository must be readable by every node.
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

from ..engine.cam import overlays
from ..engine.errors import ModelNotFound, ServingError
from ..engine.inference import PIXELS_BATCH, ImageBatch, InferenceRequest, RawTensor
from ..engine.loading import choose_version, load_execution, model_names, only_model
from ..engine.runtime import RuntimeOptions
from ..repository_format import BUNDLED_REPOSITORY, ConfigError, ModelSpec, load_spec
from .errors import BatchError
from .output import Output, WrittenWith
from .report import finish_report, summarize, unfinished, worst_mistakes
from .rows import Truth, error_row, positions_to_do, prediction_rows
from .sources import Source, open_source, resolve_labels

RAY_EXTRA_HINT = "the Ray engine needs Ray: pip install 'cnn-serving[ray]'"
# Blocks of up to 4,096 images and 64 MiB, in whole batches: each block is one task on an actor, and a task
# costs its actor about 10 ms of Ray Data on top of its batches, while a block must stay small enough to stream...
MAX_BLOCK_IMAGES = 4096
MAX_BLOCK_BYTES = 64 << 20
# ...and a small job is cut into 3 blocks per actor. Ray Data keeps 2 tasks queued per actor, so each actor
# has its next block at hand, and between two blocks an actor waits about 10 ms for Ray Data (the result
# stored, the next block fetched); the job ends when its slowest actor ends, and the cores of this machine
# do not run at one speed (one actor took 1.22 s for what the other did in 1.0), so more blocks share the
# work more evenly. On the 10,000 test images with 2 actors, 8 runs of each in turn: 3 blocks each gave a
# median of 9,100 images/s (7,100-9,700), 2 gave 8,900 (8,100-9,900); earlier, 4 gave 8,600-9,100, 6 gave
# 8,500-8,600, 1 gave 7,600-8,100, and blocks shrinking towards the end 7,900-8,500.
BLOCKS_PER_ACTOR = 3
# How long the pool may take to start (Ray's workers, imports, each actor loading its model) before the job
# says that the cluster cannot hold it, instead of waiting for ever for resources that will not come.
ACTORS_START_TIMEOUT_S = 300


def choose_model(repository: Path, model: str, version: int = 0) -> tuple[ModelSpec, int]:
    """The named model (or the repository's only one) at `version`, or (0) the newest its version policy serves."""
    if not repository.is_dir():
        raise BatchError(f"model repository {repository} is not a directory")
    names = model_names(repository)
    try:
        model = model or only_model(names, str(repository))
        if model not in names:
            raise BatchError(f"model {model!r} is not in {repository} (models: {', '.join(names) or 'none'})")
        spec = load_spec(repository / model)
        return spec, choose_version(spec, version)
    except (ModelNotFound, ConfigError) as e:  # what the server would report for the model, as one line
        raise BatchError(f"{e} ({repository})" if isinstance(e, ModelNotFound) else str(e)) from None


class Classifier:
    """The actor: one model version, loaded once with the server's code; one call per block of rows, run
    through the execution in batches of the job's batch size (each a request decoded into one buffer and run
    once). Taking the block whole saves Ray Data's slicing and conversions per batch, which cost about a
    millisecond each here. When an image of a batch cannot be decoded, the batch is sent again image by
    image, as the gRPC engine resends a failed request, so that image fails alone with the status name the
    server would answer.
    """

    def __init__(self, repository: str, model: str, version: int, top_k: int, threads: int, device: str,
                 batch_size: int):
        spec = load_spec(Path(repository) / model)
        # Spinning threads: an actor does nothing but run batches back to back (a server shares its cores).
        options = RuntimeOptions(device=device, intra_op_threads=threads, spin_wait=True)
        # Warmed up (on a GPU: buffers and CUDA graphs made) for the job's batch size, not the config's max
        # (the server's batcher bound): here the first run of 256 images unwarmed took 0.1-0.3 s, the next 0.06 s.
        self.execution = load_execution(spec, version, options, instances=1, max_batch_size=batch_size).execution
        self.top_k, self.batch_size = top_k, batch_size

    def __call__(self, block: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        called_at = time.time()  # wall clock: the driver compares it with its own (one machine, or synced ones)
        column = next(block[name] for name in ("pixels", "path", "encoded") if name in block)
        n, k = len(column), self.top_k
        out = {"position": block["position"], "top_index": np.zeros((n, k), np.int64),
               "top_score": np.zeros((n, k), np.float32), "error_status": np.full(n, "", object),
               "error_message": np.full(n, "", object), "called_at": np.full(n, called_at)}
        for start in range(0, n, self.batch_size):
            self._classify(column, start, min(start + self.batch_size, n), out)
        # Text columns as numpy strings, not Python objects: Ray Data stores them as Arrow in one step, where
        # object columns cost it 3 us an image (8 ms a block of 2,496, in the gap between two blocks).
        for name in ("error_status", "error_message"):
            out[name] = out[name].astype(str)
        return out

    def _classify(self, column: np.ndarray, start: int, stop: int, out: dict[str, np.ndarray]) -> None:
        """The batch of rows [start, stop) of a block into the same rows of its outputs."""
        k, images = self.top_k, self._model_inputs(column, start, stop)
        (whole,) = self.execution.execute([InferenceRequest(images)])
        if not isinstance(whole, Exception):
            out["top_index"][start:stop], out["top_score"][start:stop] = (whole.ranking[:, :k],
                                                                          whole.ranked_probabilities[:, :k])
            return
        requests = [InferenceRequest(images[i:i + 1]) for i in range(len(images))]
        for row, result in enumerate(self.execution.execute(requests), start):
            if isinstance(result, Exception):
                status = result.status if isinstance(result, ServingError) else "INTERNAL"
                out["error_status"][row], out["error_message"][row] = status, str(result)
            else:
                out["top_index"][row], out["top_score"][row] = result.ranking[0, :k], result.ranked_probabilities[0, :k]

    def _model_inputs(self, column: np.ndarray, start: int, stop: int) -> ImageBatch | list:
        """Rows [start, stop) of a block as the execution takes them: in-memory pixels as one batch of pictures,
        converted by the engine in one step (as tensors, one per image, they would cost a copy each); file
        paths and encoded bytes as the images a server receives."""
        if column.dtype == np.uint8:
            return ImageBatch((stop - start, *column.shape[1:]), "uint8",
                              np.ascontiguousarray(column[start:stop]), PIXELS_BATCH)
        return [_wire_image(item) for item in column[start:stop]]


def _wire_image(stored):
    """An input as it is stored (uint8 pixels, a file path, encoded bytes) in the form a server receives it:
    pixels as a raw uint8 tensor, a file's bytes as an encoded image."""
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


def block_bounds(source: Source, images: int, batch_size: int, actors: int) -> list[tuple[int, int]]:
    """[start, stop) of each block of a job: whole batches (the last one may end short), at most
    MAX_BLOCK_IMAGES and MAX_BLOCK_BYTES of pixels, at least BLOCKS_PER_ACTOR per actor, and as many as a
    multiple of the actors, as even as whole batches allow, so that the actors end together (60,000 images in
    blocks of 4,096 were 15 blocks, and one of 2 actors stood idle for the last 0.4 s of a 6-s job)."""
    batches = -(-images // batch_size)
    largest = MAX_BLOCK_IMAGES
    if source.pixels is not None:
        largest = min(largest, MAX_BLOCK_BYTES // max(1, int(np.prod(source.pixels.shape[1:]))))
    count = max(-(-batches // max(1, largest // batch_size)), actors * BLOCKS_PER_ACTOR)
    count = min(batches, -(-count // actors) * actors)
    edges = [min(images, round(batches * b / count) * batch_size) for b in range(count + 1)]
    return list(zip(edges, edges[1:]))


def _dataset(ray, source: Source, todo: np.ndarray, bounds: list[tuple[int, int]]):
    """The images to classify as a Ray Dataset of blocks (`bounds` in `todo`): positions, and the pixels, file
    paths or encoded bytes of each. The driver lists every input here, so the actor pool is the plan's
    only operator that needs CPUs (there are no read tasks) and may take all of them."""
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray
    tables = []
    for start, stop in bounds:
        positions = todo[start:stop]
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
    _start_ray(ray, args.ray_address, None if args.ray_address else os.cpu_count())
    try:
        _configure_ray_data(ray)
        threads, resources = args.threads_per_actor, ray.cluster_resources()
        actors = pool_size(resources, args.num_actors, threads, args.gpus_per_actor)
        if not args.ray_address:  # a local node never grows: a pool it cannot hold fails now, not after a wait
            _check_fits(resources, actors, threads, args.gpus_per_actor)
        run = RayRun(actors=actors, threads_per_actor=threads)
        device = "cuda" if args.gpus_per_actor else "cpu"
        bounds = block_bounds(source, len(todo), args.batch_size, actors)
        classified = _dataset(ray, source, todo, bounds).map_batches(
            Classifier, fn_constructor_kwargs=dict(repository=str(spec.directory.parent.resolve()), model=spec.name,
                                                   version=version, top_k=top_k, threads=threads, device=device,
                                                   batch_size=args.batch_size),
            batch_size=None, compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=threads,
            num_gpus=args.gpus_per_actor or None, batch_format="numpy")
        first_call = None
        for batch in _batches_of(ray, classified, actors, threads, args.gpus_per_actor):
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


def _configure_ray_data(ray) -> None:
    """Ray Data's settings for this plan, and its own actors started before the pool's first block."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # ours counts rows written
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # its plan and timing lines, at every run
    # The pool starts whole before the first block goes out, so that no actor still loading its model leaves
    # the others the job's start (and a pool the cluster cannot hold fails, naming what it asked).
    context.wait_for_min_actors_s = ACTORS_START_TIMEOUT_S
    # No object-store budget: the inputs are in the object store before the job starts and the outputs are a
    # few hundred bytes per image, so it would protect nothing, while a new execution's budget is zero until
    # Ray Data's autoscaling coordinator first answers (both actors stood idle for a third of a
    # 10,000-image job here). Its other backpressure policies stay.
    try:
        from ray.data._internal.execution import backpressure_policy as policies
        kept = [p for p in policies.ENABLED_BACKPRESSURE_POLICIES if p.__name__ != "ResourceBudgetBackpressurePolicy"]
        context.set_config(policies.ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY, kept)
    except (ImportError, AttributeError):  # another Ray's layout: its defaults, slower to start
        pass
    # Ray Data starts its own actors (statistics, autoscaling coordination) with a driver's first dataset,
    # each a new worker process costing about a CPU-second: a one-row dataset starts them now, so that they
    # do not take the pool's cores while it classifies (it halved a 10,000-image job's rate on 2 cores).
    ray.data.range(1).materialize()


def pool_size(resources: dict, actors: int, threads: int, gpus_per_actor: float) -> int:
    """Actors in the pool: those asked for, or by default an actor per `threads` CPUs of the cluster (one
    onnxruntime thread each by default: on these 2 cores, 2 actors of 1 thread classified 7,700 images/s where
    1 actor of 2 threads did 6,900, since a single-threaded run never waits for a sibling thread that another
    process delayed), or with GPUs an actor per `gpus_per_actor` of the cluster's GPUs."""
    if not actors:
        gpus = resources.get("GPU", 0)
        actors = int(gpus // gpus_per_actor) if gpus_per_actor else int(resources.get("CPU", 1)) // threads
    return max(1, actors)


def _pool_text(actors: int, threads: int, gpus_per_actor: float) -> str:
    return f"{actors} actor(s) of {threads} CPU(s)" + (f" and {gpus_per_actor:g} GPU(s)" if gpus_per_actor else "")


def _has(resources: dict) -> str:
    return f"it has {resources.get('CPU', 0):g} CPU(s) and {resources.get('GPU', 0):g} GPU(s)"


def _check_fits(resources: dict, actors: int, threads: int, gpus_per_actor: float) -> None:
    if actors * threads > resources.get("CPU", 0) or actors * gpus_per_actor > resources.get("GPU", 0):
        raise BatchError(f"this machine's Ray cannot hold {_pool_text(actors, threads, gpus_per_actor)} "
                         f"({_has(resources)}); ask for fewer with --num-actors or --threads-per-actor")


def _batches_of(ray, classified, actors: int, threads: int, gpus_per_actor: float):
    """The classified batches as they come back; a pool that does not start in time is a BatchError that says
    what it asked for."""
    try:
        yield from classified.iter_batches(batch_size=None, batch_format="numpy")
    except ray.exceptions.GetTimeoutError:
        raise BatchError(f"the Ray cluster did not start {_pool_text(actors, threads, gpus_per_actor)} within "
                         f"{ACTORS_START_TIMEOUT_S} s ({_has(ray.cluster_resources())}); ask for fewer with "
                         "--num-actors") from None


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
    labels = np.asarray(spec.labels, object)[batch["top_index"][ok]].tolist()
    rows, _ = prediction_rows(source, positions, labels, batch["top_score"][ok], batch["top_index"][ok, 0], truth)
    for position, status, message in zip(batch["position"][~ok].tolist(), batch["error_status"][~ok].tolist(),
                                         batch["error_message"][~ok].tolist(), strict=True):
        rows.append(error_row(source, position, status, message))
    return rows


def _mistake_overlays(spec: ModelSpec, version: int, source: Source, positions: np.ndarray) -> list:
    """CAM overlays of the mistakes, computed in the driver with the same code (the inputs themselves when
    the model cannot explain)."""
    pictures = [source.picture(int(p)) for p in positions]
    if not pictures:
        return pictures
    loaded = load_execution(spec, version, RuntimeOptions(device="cpu"), instances=1)
    if loaded.cam_unsupported_reason:
        return pictures
    request = InferenceRequest([_wire_image(p) for p in pictures], cam=True, keep_inputs=True)
    (result,) = loaded.execution.execute([request])
    if isinstance(result, Exception):
        return pictures
    return overlays(result.inputs, result.cams)


def run_job(args: argparse.Namespace) -> int:
    if args.cam_dir:
        raise BatchError("--cam-dir is for the gRPC engine; the Ray engine writes rows and the summary")
    source = open_source(args)
    spec, version = choose_model(Path(args.model_repository or BUNDLED_REPOSITORY), args.model,
                                 args.model_version)
    for warning in spec.warnings:  # what of its config.pbtxt is not applied, by name, as the server logs it
        print(f"warning: model {spec.name}: config.pbtxt {warning}", file=sys.stderr)
    top_k = max(1, min(args.top_k, spec.num_classes))
    output = Output(args.output, top_k)
    written = output.begin(WrittenWith(spec.name, version), fresh=args.fresh)  # before Ray starts: a refusal is quick
    todo, already = positions_to_do(source, written, args.stop_after)
    truth = Truth(*resolve_labels(source.labels, spec.labels))
    print(f"{source.description}: {len(source)} images, {already} done already, {len(todo)} to classify with "
          f"{spec.name} v{version} on Ray", file=sys.stderr)
    from tqdm import tqdm
    output.open()
    try:
        with tqdm(total=len(source), initial=already, unit="img", disable=True if args.no_progress else None, smoothing=0.1,
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
