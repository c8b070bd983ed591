"""Verify the bundled model end to end: every Fashion-MNIST test image sent as a PNG through the real
server, accuracy compared with onnxruntime offline and with the checkpoint's own test accuracy, and
Explain heatmaps compared with CAMs computed by PyTorch from the same checkpoint.

    python bench/verify_bundled.py --data-dir /usr/share/datasets/fashion-mnist [--checkpoint runs/small_fmnist/checkpoint.pt]
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from serving.client import ClassifierClient  # noqa: E402
from training.data import load_idx_dataset  # noqa: E402


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir")
    ap.add_argument("--model-repository", "--repository", dest="repository", default=str(ROOT / "model_repository"),
                    help="the repository to serve (--repository: the older spelling)")
    ap.add_argument("--model", default="fashion_mnist")
    ap.add_argument("--checkpoint", help="compare Explain with CAMs from this PyTorch checkpoint")
    ap.add_argument("--batch", type=int, default=100)
    args = ap.parse_args()

    test = load_idx_dataset("fashion-mnist", args.data_dir).test
    images, labels = test.images[..., 0], test.labels
    onnx_path = sorted((Path(args.repository) / args.model).glob("*/model.onnx"))[-1]
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    offline = sess.run(["logits"], {"input": images[:, None].astype(np.float32) / 255})[0].argmax(1)

    proc = subprocess.Popen([sys.executable, "-m", "serving", "serve", "--model-repository", args.repository,
                             "--port", "0", "--http-port", "0", "--log-level", "WARNING"], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT)
    address = proc.stdout.readline().split()[1]
    try:
        with ClassifierClient(address) as client:
            encoded = [png(a) for a in images]
            started = time.perf_counter()
            served = []
            for i in range(0, len(encoded), args.batch):
                served += [r[0].index for r in client.classify(encoded[i:i + args.batch], model=args.model, top_k=1)]
            elapsed = time.perf_counter() - started
            served = np.array(served)
            print(f"served accuracy  {100 * (served == labels).mean():.2f}% over {len(labels)} PNGs "
                  f"({len(labels) / elapsed:.0f} images/s in requests of {args.batch})")
            print(f"offline accuracy {100 * (offline == labels).mean():.2f}% (onnxruntime on the same file); "
                  f"predictions identical: {bool((served == offline).all())}")
            single = []
            for a in encoded[:200]:
                t = time.perf_counter()
                client.classify([a], model=args.model, top_k=1)
                single.append(time.perf_counter() - t)
            t_explain = []
            for a in encoded[:200]:
                t = time.perf_counter()
                client.explain([a], model=args.model)
                t_explain.append(time.perf_counter() - t)
            print(f"single-image latency p50: Classify {1000 * np.median(single):.2f} ms, "
                  f"Explain {1000 * np.median(t_explain):.2f} ms")
            if args.checkpoint:
                import torch
                import torch.nn.functional as F

                from training.checkpoints import load_checkpoint
                from training.models import compute_cam
                model, _ = load_checkpoint(args.checkpoint)
                n = 256
                heat = np.stack([e.heatmap for e in client.explain(encoded[:n], model=args.model)])
                with torch.no_grad():
                    x = torch.from_numpy(images[:n, None].astype(np.float32) / 255)
                    f = model.forward_features(x)
                    cls = model.forward_head(f).argmax(1)
                    cam = F.interpolate(compute_cam(f, model.cam_weights(), cls)[:, None], size=(28, 28),
                                        mode="bilinear", align_corners=False)[:, 0]
                    lo, hi = cam.amin(dim=(1, 2), keepdim=True), cam.amax(dim=(1, 2), keepdim=True)
                    ref = ((cam - lo) / (hi - lo)).numpy()
                print(f"Explain vs PyTorch CAM from the checkpoint: max abs difference {np.abs(heat - ref).max():.2e} "
                      f"over {n} images")
    finally:
        proc.terminate()
        proc.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
