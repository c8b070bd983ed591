"""The two batch engines against in-process onnxruntime, on the Fashion-MNIST test (or train) images, in one run.

    python bench/batch_engines.py --data-dir /usr/share/datasets/fashion-mnist --out bench/results/cpu_batch_engines.md

Rows: onnxruntime in this process at its best batch size and thread layout (the model alone, float input
ready: the ceiling);
the gRPC engine (`python -m serving batch` streaming to a local server with the bundled model); the Ray
engine (`--engine ray`, a local Ray). Each engine's images/s is its own summary's: from its first request
(gRPC) or its first actor call (Ray) to its last row written, so start-up (the server's, Ray's and the actors') is
excluded; the Ray start-up is stated apart. Predictions of the two engines are compared row by row.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

from serving_bench import start_process, stop_process  # noqa: E402

from serving.idx import read_idx  # noqa: E402

FILES = {"test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
         "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")}


def in_process(model_file: Path, images: np.ndarray, batches: list[int]) -> tuple[float, str]:
    """Images/s of onnxruntime over the whole set at its best batch size and layout (the median of three
    passes after a warm-up run), and that configuration: one session with a thread per core, or a session
    of one thread per core, each running its share of the set in a thread of its own (the Ray pool's shape;
    onnxruntime releases the GIL), whichever is faster."""
    import onnxruntime as ort
    cores = os.cpu_count() or 1

    def session(threads: int) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        return ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])

    x = (images[:, None] / np.float32(255)).astype(np.float32)
    whole, singles = session(cores), [session(1) for _ in range(cores)]

    def run(s: ort.InferenceSession, part: np.ndarray, n: int) -> None:
        for i in range(0, len(part), n):
            s.run(["logits"], {"input": part[i:i + n]})

    def pooled(n: int) -> None:
        parts = np.array_split(x, cores)
        with ThreadPoolExecutor(cores) as pool:
            list(pool.map(run, singles, parts, [n] * cores))

    layouts = {f"one session of {cores} threads": lambda n: run(whole, x, n),
               f"{cores} sessions of 1 thread": pooled}
    best = (0.0, "")
    for name, layout in layouts.items():
        for n in batches:
            run(whole, x[:n], n)
            for s in singles:
                run(s, x[:n], n)
            rates = []
            for _ in range(3):  # the median of three passes: one pass is about a second on a shared machine
                started = time.perf_counter()
                layout(n)
                rates.append(len(x) / (time.perf_counter() - started))
            best = max(best, (float(np.median(rates)), f"batch {n}, {name}"))
    return best


def run_job(args: list[str], output: Path) -> dict:
    done = subprocess.run([sys.executable, "-m", "serving", "batch", *args, "-o", str(output), "--no-progress"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"batch job failed: {done.stderr[-2000:]}")
    return json.loads(Path(f"{output}.summary.json").read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/batch_engines.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="folder with the Fashion-MNIST IDX files")
    p.add_argument("--split", choices=list(FILES), default="test", help="the 10,000 test or the 60,000 train images")
    p.add_argument("--repository", default=str(ROOT / "model_repository"))
    p.add_argument("--batch-size", type=int, default=64, help="images per request (gRPC) or onnxruntime run (Ray): the jobs' default")
    p.add_argument("--out", help="also write the table here")
    args = p.parse_args(argv)
    data = Path(args.data_dir)
    images_file, labels_file = (data / name for name in FILES[args.split])
    idx = ["--idx-images", str(images_file), "--idx-labels", str(labels_file)]
    images = read_idx(images_file)
    model_file = next(Path(args.repository).glob("*/1/model.onnx"))

    ceiling, best = in_process(model_file, images, [64, 256, 1024])
    with tempfile.TemporaryDirectory() as tmp:
        server, address = start_process(["-m", "serving", "serve", "--model-repository", args.repository, "--port",
                                         "0", "--log-level", "WARNING", "--max-batch-size", str(args.batch_size)])
        try:
            grpc_summary = run_job([*idx, "--server", address, "--batch-size", str(args.batch_size)],
                                   Path(tmp) / "grpc.jsonl")
        finally:
            stop_process(server)
        ray_summary = run_job([*idx, "--engine", "ray", "--model-repository", args.repository, "--batch-size",
                               str(args.batch_size)], Path(tmp) / "ray.jsonl")
        grpc_rows = {r["id"]: r for r in map(json.loads, (Path(tmp) / "grpc.jsonl").read_text().splitlines())}
        ray_rows = {r["id"]: r for r in map(json.loads, (Path(tmp) / "ray.jsonl").read_text().splitlines())}
    same = sum(grpc_rows[i] == ray_rows.get(i) for i in grpc_rows)
    rows = [("onnxruntime in process", ceiling, f"{best}, the model alone", None),
            ("gRPC engine (one local server)", grpc_summary["images_per_second"],
             f"accuracy {100 * grpc_summary['accuracy']:.2f}%", None),
            ("Ray engine (local Ray)", ray_summary["images_per_second"],
             f"accuracy {100 * ray_summary['accuracy']:.2f}%, {ray_summary['actors']} actor(s) x "
             f"{ray_summary['threads_per_actor']} threads", ray_summary["startup_seconds"])]
    lines = ["| engine | images/s | of in-process | start-up s (excluded) | notes |", "|---|---:|---:|---:|---|"]
    lines += [f"| {name} | {rate:,.0f} | {rate / ceiling:.2f} | {'' if start is None else f'{start:.1f}'} | {note} |"
              for name, rate, note, start in rows]
    lines.append(f"\n{len(images):,} {args.split} images; rows identical between the two engines: {same:,} of "
                 f"{len(grpc_rows):,}")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
