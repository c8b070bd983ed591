"""Command line: `python -m training train|export|models ...`."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p_train = sub.add_parser("train", help="train a model; writes checkpoint, metrics and plots to out_dir")
    p_train.add_argument("--config", help="YAML or TOML experiment file")
    p_train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. epochs=5 augment.hflip=true")

    p_export = sub.add_parser("export", help="export a checkpoint to ONNX into a model repository")
    p_export.add_argument("checkpoint", nargs="?", help="checkpoint.pt written by train")
    p_export.add_argument("--repository", default="model_repository")
    p_export.add_argument("--name", help="model name in the repository (default: the architecture's)")
    p_export.add_argument("--version", type=int, help="version number (default: next free)")
    p_export.add_argument("--all", action="store_true", help="export every registered model (random weights "
                          "unless --checkpoint-dir has a trained one)")
    p_export.add_argument("--models", help="with --all: only these (comma-separated registry names)")
    p_export.add_argument("--checkpoint-dir", help="with --all: use <dir>/<model>/checkpoint.pt when present")
    p_export.add_argument("--data-dir", help="Fashion-MNIST directory for the parity batch (real images)")
    p_export.add_argument("--max-batch-size", type=int, default=64)
    p_export.add_argument("--fp16", action="store_true", help="also write a float16 version")
    p_export.add_argument("--quantize", choices=["dynamic", "static"], help="also write an INT8 version")

    sub.add_parser("models", help="list the registered models")
    args = parser.parse_args(argv)

    if args.command == "train":
        from .train import load_config, train
        train(load_config(args.config, args.overrides))
    elif args.command == "export":
        from .export import export_main
        export_main(args)
    elif args.command == "models":
        from .models import list_models, model_entry
        for name in list_models():
            print(f"{name:24s} {model_entry(name).family}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
