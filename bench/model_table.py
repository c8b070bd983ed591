"""The CNN range table of docs/training.md: parameters, FLOPs, ONNX size and parity error of every registered
model at 28x28x1 (10 classes), Fashion-MNIST test accuracy where a run exists in runs/<model>/, and the
published parameter counts in the classic configurations.

    python bench/model_table.py [--runs runs] [--out bench/results/model_table.md]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from serving.repository_format import VersionMetadata  # noqa: E402
from training.export import export_to_repository  # noqa: E402
from training.models import create_model, list_models, model_entry  # noqa: E402

PUBLISHED = {  # name: (kwargs of the classic configuration, published parameter count)
    "lenet5": (dict(in_channels=1, num_classes=10, input_size=(32, 32)), 61_706),
    "alexnet": (dict(in_channels=3, num_classes=1000, input_size=(224, 224)), 61_100_840),
    "vgg16": (dict(in_channels=3, num_classes=1000, input_size=(224, 224)), 138_357_544),
    "resnet18": (dict(in_channels=3, num_classes=1000, input_size=(224, 224)), 11_689_512),
    "resnet50": (dict(in_channels=3, num_classes=1000, input_size=(224, 224)), 25_557_032),
}
ANCHORS = {"mlp": "90.0 (MLP)", "small_fmnist": "92.5 (2-conv < 100k)", "vgg16": "93.5", "resnet18": "94.9"}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", default=str(ROOT / "runs"))
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = ["| model | family | params (28x28x1) | MFLOPs | ONNX MB | parity | CAM | F-MNIST test acc % | anchor % |",
            "|---|---|---:|---:|---:|---:|---|---:|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in list_models():
            started = time.time()
            torch.manual_seed(0)
            model = create_model(name, in_channels=1, num_classes=10, input_size=(28, 28)).eval()
            params = sum(p.numel() for p in model.parameters())
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                model(torch.zeros(1, 1, 28, 28))
            vdir = export_to_repository(model, [str(i) for i in range(10)], Path(tmp), name, name, version=1)
            meta = VersionMetadata.read(vdir)
            metrics = Path(args.runs) / name / "metrics.json"
            acc = f"{100 * json.loads(metrics.read_text())['test_acc']:.2f}" if metrics.exists() else ""
            cam = "no" if meta.cam_unsupported_reason else "yes"
            rows.append(f"| {name} | {model_entry(name).family} | {params:,} | {counter.get_total_flops() / 1e6:.1f} | "
                        f"{meta.onnx_bytes / 1e6:.2f} | {meta.parity_max_abs_diff:.1e} | {cam} | {acc} | "
                        f"{ANCHORS.get(name, '')} |")
            for p in vdir.iterdir():  # keep the disk small: the big classic heads are hundreds of MB
                p.unlink()
            print(f"{name}: {time.time() - started:.1f}s", file=sys.stderr)
    rows += ["", "| classic configuration | parameters | published |", "|---|---:|---:|"]
    for name, (kwargs, published) in PUBLISHED.items():
        count = sum(p.numel() for p in create_model(name, **kwargs).parameters())
        shape = f"{kwargs['input_size'][0]}x{kwargs['input_size'][1]}x{kwargs['in_channels']}, {kwargs['num_classes']} classes"
        rows.append(f"| {name} ({shape}) | {count:,} | {published:,} |")
    text = "\n".join(rows) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
