"""`python -m serving classify|explain|models|repository|health`: the client's commands (base install)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import connection, control, health
from .sync import ClassifierClient


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default="127.0.0.1:8001", help="host:port (comma-separated for several)")
    p.add_argument("--model", default="", help="model name (default: the only one served)")
    p.add_argument("--timeout", type=float, default=30.0, help="deadline per call, seconds")
    connection.add_arguments(p)


def _client(args: argparse.Namespace) -> ClassifierClient:
    tls, token = connection.from_arguments(args)
    return ClassifierClient(args.server.split(","), timeout_s=args.timeout, tls=tls, token=token)


def cmd_classify(args) -> int:
    with _client(args) as client:
        results = client.classify([Path(f) for f in args.files], model=args.model, top_k=args.top_k)
    for f, preds in zip(args.files, results):
        if args.json:
            print(json.dumps({"file": f, "predictions": [vars(p) for p in preds]}))
        else:
            best = preds[0]
            others = ", ".join(f"{p.label} {100 * p.score:.1f}%" for p in preds[1:])
            print(f"{f}: {best.label} ({100 * best.score:.1f}%)" + (f"  | then {others}" if others else ""))
    return 0


def cmd_explain(args) -> int:
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with _client(args) as client:
        results = client.explain([Path(f) for f in args.files], model=args.model, target_class=args.target_class,
                                 overlay=True)
    for f, e in zip(args.files, results):
        path = out / f"{Path(f).stem}_cam.png"
        path.write_bytes(e.overlay_png)
        print(f"{f}: {e.target.label} ({100 * e.target.score:.1f}%) -> {path}")
    return 0


def cmd_models(args) -> int:
    with _client(args) as client:
        for name, versions in client.list_models().items():
            line = f"{name}: versions {versions or 'none ready'}"
            if versions:
                info = client.get_model(name)
                acc = info.metrics.get("test_acc")
                line += (f", {info.architecture}, input {info.input_shape}, {info.execution_provider}, "
                         f"CAM {'yes' if info.supports_cam else 'no'}" + (f", test acc {100 * float(acc):.2f}%" if acc else ""))
            print(line)
    return 0


def add_subcommands(subparsers) -> None:
    p = subparsers.add_parser("classify", help="classify image files")
    _client_args(p)
    p.add_argument("files", nargs="+")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--json", action="store_true", help="one JSON object per image")
    p.set_defaults(func=cmd_classify)
    p = subparsers.add_parser("explain", help="class activation maps as overlay PNGs")
    _client_args(p)
    p.add_argument("files", nargs="+")
    p.add_argument("--target-class", type=int, help="class index to explain (default: the predicted one)")
    p.add_argument("--out-dir", default="cam_overlays")
    p.set_defaults(func=cmd_explain)
    p = subparsers.add_parser("models", help="list the served models")
    _client_args(p)
    p.set_defaults(func=cmd_models)
    control.add_subcommand(subparsers)
    health.add_subcommand(subparsers)
