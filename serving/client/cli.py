"""`python -m serving classify|explain|models|repository|health`: the client's commands (base install)."""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..cli_support import comma_list, non_negative_int, positive_int
from . import connection, control, health
from .messages import IMAGE_SUFFIXES, InvalidArgument, images_under
from .sync import ClassifierClient

DEFAULT_TOP_K = 5  # the API's default, and batch's


class UsageError(Exception):
    """A mistake on the command line (a missing file, an unknown class name): one line, exit code 2."""


def _client_args(p: argparse.ArgumentParser, model_version: bool = True) -> None:
    p.add_argument("--server", type=comma_list, default=["127.0.0.1:8001"],
                   help="host:port, comma-separated for several (default 127.0.0.1:8001)")
    p.add_argument("--model", default="", help="model name (default: the only one served)")
    if model_version:
        p.add_argument("--model-version", type=non_negative_int, default=0, help="model version (default 0: the "
                       "newest its version policy serves)")
    p.add_argument("--timeout", type=float, default=30.0, help="deadline per call, seconds (default 30)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    connection.add_arguments(p)


def _client(args: argparse.Namespace) -> ClassifierClient:
    tls, token = connection.from_arguments(args)
    return ClassifierClient(args.server, timeout_s=args.timeout, tls=tls, token=token)


def image_files(paths: list[str]) -> list[Path]:
    """The files to send: each file as given, each folder's image files (at any depth, sorted), as `batch`
    takes a folder. A path that does not exist is a usage error that names it."""
    files: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found = images_under(path)
            if not found:
                raise UsageError(f"{name}: a folder with no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise UsageError(f"{name}: no such file or folder")
    return files


def _read(files: list[Path]) -> list[bytes | str]:
    """Each file's bytes, or the reason it cannot be read (the other files still go)."""
    out: list[bytes | str] = []
    for f in files:
        try:
            out.append(f.read_bytes())
        except OSError as e:
            out.append(e.strerror or str(e))
    return out


def _each_image(call: Callable[[list[bytes]], list], images: list[bytes | str]) -> list:
    """One result per image, or the text of its error. The images go in one call; when the server refuses it as
    invalid (one bad image fails the whole request), each image goes alone, so the good ones are answered and
    the bad one is named."""
    readable = [i for i, image in enumerate(images) if isinstance(image, bytes)]
    results: list = [image if isinstance(image, str) else None for image in images]
    if not readable:
        return results
    try:
        for i, result in zip(readable, call([images[i] for i in readable]), strict=True):
            results[i] = result
        return results
    except InvalidArgument as e:
        if len(readable) == 1:
            results[readable[0]] = str(e)
            return results
    for i in readable:
        try:
            results[i] = call([images[i]])[0]
        except InvalidArgument as e:
            results[i] = str(e)
    return results


def _report_errors(files: list[Path], results: list) -> int:
    failed = [(f, r) for f, r in zip(files, results, strict=True) if isinstance(r, str)]
    for f, reason in failed:
        print(f"error: {f}: {reason}", file=sys.stderr)
    return 2 if failed else 0


def cmd_classify(args) -> int:
    files = image_files(args.files)
    with _client(args) as client:
        results = _each_image(lambda images: client.classify(images, model=args.model, top_k=args.top_k,
                                                             version=args.model_version), _read(files))
    for f, preds in zip(files, results, strict=True):
        if isinstance(preds, str):
            continue
        if args.json:
            print(json.dumps({"file": str(f), "predictions": [vars(p) for p in preds]}))
        else:
            best = preds[0]
            others = ", ".join(f"{p.label} {100 * p.score:.1f}%" for p in preds[1:])
            print(f"{f}: {best.label} ({100 * best.score:.1f}%)" + (f"  | then {others}" if others else ""))
    return _report_errors(files, results)


def target_index(target: str | None, labels: list[str]) -> int | None:
    """--target-class as the API takes it: an index as given, or a class name (any case) turned into its index."""
    if target is None or target == "":
        return None
    if target.lstrip("-").isdigit():
        return int(target)
    by_name = {label.lower(): i for i, label in enumerate(labels)}
    if target.lower() in by_name:
        return by_name[target.lower()]
    close = difflib.get_close_matches(target, labels, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f" (classes: {', '.join(labels)})"
    raise UsageError(f"--target-class {target!r} is not a class of the model{hint}")


def cam_stem(path: Path) -> str:
    """The name an image's CAM files start with: `bag.png` gives `bag_cam` (then .png and .npy)."""
    return f"{path.stem}_cam"


def cmd_explain(args) -> int:
    files = image_files(args.files)
    out = Path(args.out_dir)
    with _client(args) as client:
        target = args.target_class
        if target is not None and not target.lstrip("-").isdigit():  # a class name: the model's labels say which
            target = target_index(target, client.get_model(args.model, args.model_version).labels)
        elif target is not None:
            target = int(target)
        out.mkdir(parents=True, exist_ok=True)
        results = _each_image(lambda images: client.explain(images, model=args.model, target_class=target,
                                                            overlay=True, version=args.model_version), _read(files))
    for f, e in zip(files, results, strict=True):
        if isinstance(e, str):
            continue
        png, heatmap = out / f"{cam_stem(f)}.png", out / f"{cam_stem(f)}.npy"
        png.write_bytes(e.overlay_png)
        np.save(heatmap, e.heatmap)  # the raw map, float32 [H, W] in [0, 1], for analysis beyond the picture
        if args.json:
            print(json.dumps({"file": str(f), "target": vars(e.target), "overlay": str(png), "heatmap": str(heatmap)}))
        else:
            print(f"{f}: {e.target.label} ({100 * e.target.score:.1f}%) -> {png}, {heatmap.name}")
    return _report_errors(files, results)


def cmd_models(args) -> int:
    with _client(args) as client:
        for name, versions in client.list_models().items():
            info = client.get_model(name) if versions else None
            if args.json:
                row: dict = {"name": name, "versions": versions}
                if info:
                    row.update(architecture=info.architecture, parameters=info.parameters,
                               labels=info.labels, input_shape=list(info.input_shape),
                               execution_provider=info.execution_provider, supports_cam=info.supports_cam,
                               metrics=info.metrics)
                print(json.dumps(row))
                continue
            line = f"{name}: versions {versions or 'none ready'}"
            if info:
                acc = info.metrics.get("test_acc")
                line += (f", {info.architecture}, input {info.input_shape}, {info.execution_provider}, "
                         f"CAM {'yes' if info.supports_cam else 'no'}"
                         + (f", test acc {100 * acc:.2f}%" if isinstance(acc, float) else ""))
            print(line)
    return 0


def add_subcommands(subparsers) -> None:
    p = subparsers.add_parser("classify", help="classify image files (or the images in folders)")
    _client_args(p)
    p.add_argument("files", nargs="+", help="image files, or folders of them")
    p.add_argument("--top-k", type=positive_int, default=DEFAULT_TOP_K,
                   help=f"predictions per image (default {DEFAULT_TOP_K})")
    p.set_defaults(func=cmd_classify)
    p = subparsers.add_parser("explain", help="class activation maps: an overlay PNG and the raw map (.npy) per "
                              "image")
    _client_args(p)
    p.add_argument("files", nargs="+", help="image files, or folders of them")
    p.add_argument("--target-class", help="class to explain, by index or name (default: the predicted one)")
    p.add_argument("--out-dir", default="cam_overlays", help="where <image>_cam.png and <image>_cam.npy go "
                   "(default cam_overlays)")
    p.set_defaults(func=cmd_explain)
    p = subparsers.add_parser("models", help="list the served models")
    _client_args(p, model_version=False)
    p.set_defaults(func=cmd_models)
    control.add_subcommand(subparsers)
    health.add_subcommand(subparsers)
