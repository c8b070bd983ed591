"""The two batch engines against in-process onnxruntime, on the Fashion-MNIST test (or train) images, in one run.

    python bench/batch_engines.py --data-dir /usr/share/datasets/fashion-mnist --out bench/results/cpu_batch_engines.md

Rows: onnxruntime in this process at its best batch size and thread layout (the model alone, float input
ready: the ceiling); the gRPC engine (`python -m serving batch` streaming to a local server with the bundled
model); the Ray engine (`--engine ray`, a local Ray). Each engine's images/s is its own summary's: from its
first request (gRPC) or its first actor call (Ray) to its last row written, so start-up (the server's, Ray's
and the actors') is excluded; the Ray start-up is stated apart. Each engine is run `--repeats` times, in
turn, and each run is compared with the in-process passes just before and after it; the table gives the
medians and every run, and how much CPU the machine's host took back meanwhile. Predictions of the two
engines are compared row by row.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

from serving_bench import start_process, stop_process  # noqa: E402

from serving.idx import read_idx  # noqa: E402

FILES = {"test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
         "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")}


def in_process(model_file: Path, images: np.ndarray, batches: list[int]) -> tuple[Callable[[], float], str]:
    """onnxruntime over the whole set at its best batch size and layout: a function measuring its images/s
    (the median of three passes), and that configuration. The layouts: one session with a thread per core, or
    a session of one thread per core, each running its share of the set in a thread of its own (the Ray
    pool's shape; onnxruntime releases the GIL)."""
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
        with ThreadPoolExecutor(cores) as pool:
            list(pool.map(run, singles, np.array_split(x, cores), [n] * cores))

    def rate(layout: Callable[[int], None], n: int) -> float:
        rates = []
        for _ in range(3):  # the median of three passes: one pass is about a second on a shared machine
            started = time.perf_counter()
            layout(n)
            rates.append(len(x) / (time.perf_counter() - started))
        return float(np.median(rates))

    for s in [whole, *singles]:  # warm-up runs
        for n in batches:
            run(s, x[:n], n)
    layouts = {f"one session of {cores} threads": lambda n: run(whole, x, n), f"{cores} sessions of 1 thread": pooled}
    _, name, n = max((rate(layout, n), name, n) for name, layout in layouts.items() for n in batches)
    return (lambda: rate(layouts[name], n)), f"batch {n}, {name}"


def wait_until_idle(timeout_s: float = 15.0, idle_share: float = 0.9) -> None:
    """Wait until the machine's CPUs are at least `idle_share` idle over half a second (a job's processes,
    Ray's above all, may still be exiting when it returns), at most `timeout_s`: an in-process pass sharing
    the cores with them would lower the ceiling the next job is compared with."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        before = psutil.cpu_times()
        time.sleep(0.5)
        after = psutil.cpu_times()
        spent = {kind: getattr(after, kind) - getattr(before, kind) for kind in after._fields}
        idle = spent["idle"] + spent.get("iowait", 0.0)
        if sum(spent.values()) > 0 and idle / sum(spent.values()) >= idle_share:
            return


def stolen_cpu_seconds() -> float:
    """CPU time this virtual machine's host has taken from it so far (the steal column; 0 where there is none)."""
    return getattr(psutil.cpu_times(), "steal", 0.0)


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
    p.add_argument("--model-repository", "--repository", dest="repository", default=str(ROOT / "model_repository"),
                   help="the repository to serve (--repository: the older spelling)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="images per request (gRPC) or onnxruntime run (Ray); 64 is the jobs' default")
    p.add_argument("--repeats", type=int, default=3, help="runs of each row, in turn; the table gives the median")
    p.add_argument("--out", help="also write the table here")
    args = p.parse_args(argv)
    data = Path(args.data_dir)
    images_file, labels_file = (data / name for name in FILES[args.split])
    idx = ["--idx-images", str(images_file), "--idx-labels", str(labels_file)]
    images = read_idx(images_file)
    model_file = next(Path(args.repository).glob("*/1/model.onnx"))

    measure_ceiling, best = in_process(model_file, images, [64, 256, 1024])
    # The in-process pass is measured before and after every job, and each job's ratio is against the mean of
    # the two: this machine's speed drifts within seconds (its host takes CPU back), and a job compared with
    # passes minutes away from it would carry that drift into its ratio.
    ceilings, summaries, ratios = [measure_ceiling()], {"grpc": [], "ray": []}, {"grpc": [], "ray": []}
    stolen_before = stolen_cpu_seconds()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        server, address = start_process(["-m", "serving", "serve", "--model-repository", args.repository, "--port",
                                         "0", "--log-level", "WARNING", "--max-batch-size", str(args.batch_size)])
        jobs = {"grpc": ["--server", address], "ray": ["--engine", "ray", "--model-repository", args.repository]}
        try:
            for r in range(args.repeats):  # in turn, so that a slower spell of the machine falls on every row
                for engine, options in jobs.items():
                    summary = run_job([*idx, *options, "--batch-size", str(args.batch_size)],
                                      Path(tmp) / f"{engine}{r}.jsonl")
                    wait_until_idle()
                    ceilings.append(measure_ceiling())
                    summaries[engine].append(summary)
                    ratios[engine].append(summary["images_per_second"] / np.mean(ceilings[-2:]))
        finally:
            stop_process(server)
        grpc_rows = {r["id"]: r for r in map(json.loads, (Path(tmp) / "grpc0.jsonl").read_text().splitlines())}
        ray_rows = {r["id"]: r for r in map(json.loads, (Path(tmp) / "ray0.jsonl").read_text().splitlines())}
    elapsed, stolen = time.perf_counter() - started, stolen_cpu_seconds() - stolen_before
    same = sum(grpc_rows[i] == ray_rows.get(i) for i in grpc_rows)
    grpc, ray = summaries["grpc"][0], summaries["ray"][0]
    rows = [("onnxruntime in process", ceilings, None, f"{best}, the model alone", None),
            ("gRPC engine (one local server)", [s["images_per_second"] for s in summaries["grpc"]], ratios["grpc"],
             f"accuracy {100 * grpc['accuracy']:.2f}%", None),
            ("Ray engine (local Ray)", [s["images_per_second"] for s in summaries["ray"]], ratios["ray"],
             f"accuracy {100 * ray['accuracy']:.2f}%, {ray['actors']} actor(s) x {ray['threads_per_actor']} thread(s)",
             float(np.median([s["startup_seconds"] for s in summaries["ray"]])))]
    lines = ["| engine | images/s (median) | of in-process (median) | runs | ratios | start-up s (excluded) | notes |",
             "|---|---:|---:|---|---|---:|---|"]
    for name, rates, against, note, start in rows:
        ratio = 1.0 if against is None else float(np.median(against))
        lines.append(f"| {name} | {np.median(rates):,.0f} | {ratio:.2f} | {', '.join(f'{r:,.0f}' for r in rates)} | "
                     f"{'' if against is None else ', '.join(f'{x:.2f}' for x in against)} | "
                     f"{'' if start is None else f'{start:.1f}'} | {note} |")
    lines.append(f"\n{len(images):,} {args.split} images, {args.repeats} runs of each engine in turn, each against the mean "
                 f"of the in-process passes just before and after it; rows identical between the two engines: "
                 f"{same:,} of {len(grpc_rows):,}. CPU taken back by this machine's host during the jobs: "
                 f"{stolen:.1f} s of {elapsed * (os.cpu_count() or 1):.0f} s.")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
