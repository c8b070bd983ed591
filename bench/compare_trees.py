"""Two checkouts of the server, measured in one run: the same answers, the same accuracy, their throughput.

    python bench/compare_trees.py --before ../base --data-dir /usr/share/datasets/fashion-mnist

Each checkout serves the bundled model in a process of its own (`python -m serving serve` from that tree),
twice, alternating, so that the shared machine's drift falls on both. Measured on each: the accuracy of the
10,000 Fashion-MNIST test images sent as PNGs through Classify; the heatmaps of Explain for the first 200 and
the logits of KServe ModelInfer (FP32 and UINT8 tensors) for the first 1,000, compared between the two
checkouts; and requests/s with 1 and 64 callers of single-image Classify (a uint8 tensor) and ModelInfer (FP32),
with the server's CPU time per request. Prints one table with the ratio after/before.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from serving_bench import _kserve_request, _request, drive, start_process, stop_process  # noqa: E402

from serving.client import ClassifierClient  # noqa: E402
from serving.idx import read_idx  # noqa: E402

MODEL = "fashion_mnist"
CLASSIFY, INFER = "/classifier.v1.Classifier/Classify", "/inference.GRPCInferenceService/ModelInfer"


def png(picture: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    return buffer.getvalue()


def answers(address: str, images: np.ndarray, labels: np.ndarray) -> dict:
    import tritonclient.grpc as triton
    with ClassifierClient(address, timeout_s=120) as client:
        predicted = []
        for start in range(0, len(images), 100):
            results = client.classify([png(p) for p in images[start:start + 100]], model=MODEL, top_k=1)
            predicted += [r[0].index for r in results]
        heatmaps = np.stack([e.heatmap for e in client.explain([png(p) for p in images[:200]], model=MODEL)])
    triton_client = triton.InferenceServerClient(address)
    logits = {}
    for datatype, x in (("FP32", images[:1000, None].astype(np.float32) / 255), ("UINT8", images[:1000, None])):
        tensor = triton.InferInput("input", list(x.shape), datatype)
        tensor.set_data_from_numpy(x)
        logits[datatype] = triton_client.infer(MODEL, [tensor]).as_numpy("logits")
    triton_client.close()
    return {"accuracy": float(np.mean(np.array(predicted) == labels)), "predicted": np.array(predicted),
            "heatmaps": heatmaps, "logits": logits}


def throughput(address: str, pid: int, seconds: float) -> dict:
    loads = {}
    for name, method, payload in (("Classify", CLASSIFY, _request(MODEL, 1, 28, 1)),
                                  ("ModelInfer", INFER, _kserve_request(MODEL, 1, 28))):
        for callers in (1, 64):
            loads[(name, callers)] = asyncio.run(drive(address, method, payload, 1, callers, seconds, pid))
    return loads


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", type=Path, required=True, help="the other checkout")
    p.add_argument("--after", type=Path, default=ROOT)
    p.add_argument("--data-dir", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    images = read_idx(args.data_dir / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(args.data_dir / "t10k-labels-idx1-ubyte.gz")
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    seen: dict[str, dict] = {}
    loads: dict[str, list[dict]] = {name: [] for name in trees}
    for round_ in range(args.rounds):
        for name, tree in trees.items():
            # One server process each (a checkout with `--workers` would otherwise start one per core).
            env = {**os.environ, "CNN_SERVING_WORKERS": "1"}
            proc, address = start_process(["-m", "serving", "serve", "--port", "0",
                                           "--model-repository", str(tree / "model_repository")], cwd=tree, env=env)
            try:
                if round_ == 0:
                    seen[name] = answers(address, images, labels)
                loads[name].append(throughput(address, proc.pid, args.seconds))
            finally:
                stop_process(proc)
    before, after = seen["before"], seen["after"]
    print(f"| | before ({trees['before'].name}) | after ({trees['after'].name}) |\n|---|---:|---:|")
    print(f"| accuracy, 10,000 test PNGs through Classify | {before['accuracy']:.2%} | {after['accuracy']:.2%} |")
    print(f"| predictions that differ | | {int((before['predicted'] != after['predicted']).sum())} |")
    print(f"| Explain heatmaps (200), max abs difference | | {np.abs(before['heatmaps'] - after['heatmaps']).max():.2e} |")
    for datatype in ("FP32", "UINT8"):
        diff = np.abs(before["logits"][datatype] - after["logits"][datatype]).max()
        print(f"| ModelInfer {datatype} logits (1,000), max abs difference | | {diff:.2e} |")
    print("\n| single image | callers | before req/s | after req/s | after / before | before server ms/req | "
          "after server ms/req |\n|---|---:|---:|---:|---:|---:|---:|")
    for key in loads["before"][0]:
        b = np.median([r[key].requests_per_s for r in loads["before"]])
        a = np.median([r[key].requests_per_s for r in loads["after"]])
        bc = np.median([r[key].server_cpu_ms for r in loads["before"]])
        ac = np.median([r[key].server_cpu_ms for r in loads["after"]])
        print(f"| {key[0]} | {key[1]} | {b:,.0f} | {a:,.0f} | {a / b:.2f} | {bc:.2f} | {ac:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
