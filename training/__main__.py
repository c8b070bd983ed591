"""Command line: `python -m training train|export|models ...`."""

from __future__ import annotations

import argparse
import os
import sys

from serving.cli_support import add_alias, prog_name

DEFAULT_REPOSITORY = "model_repository"


def build_parser() -> argparse.ArgumentParser:
    from .config import config_keys_help

    parser = argparse.ArgumentParser(prog=prog_name("training"), description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p_train = sub.add_parser("train", help="train a model; writes checkpoint, metrics and plots to out_dir",
                             formatter_class=argparse.RawDescriptionHelpFormatter, epilog=config_keys_help())
    p_train.add_argument("--config", help="YAML or TOML experiment file")
    p_train.add_argument("--no-progress", action="store_true", help="no progress bar, as progress=false (it is off "
                         "by itself when stderr is not a terminal)")
    p_train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. epochs=5 augment.hflip=true "
                         "(the keys are listed below)")

    p_export = sub.add_parser("export", help="export a checkpoint to ONNX into a model repository")
    p_export.add_argument("checkpoint", nargs="?", help="checkpoint.pt written by train")
    p_export.add_argument("--model-repository", default=DEFAULT_REPOSITORY,
                          help=f"the repository to write into (default {DEFAULT_REPOSITORY})")
    add_alias(p_export, "--repository", "--model-repository", dest="model_repository")
    p_export.add_argument("--name", help="model name in the repository (default: the architecture's)")
    p_export.add_argument("--version", type=int, help="version number (default: next free)")
    p_export.add_argument("--all", action="store_true", help="export every registered model (random weights "
                          "unless --checkpoint-dir has a trained one)")
    p_export.add_argument("--models", help="with --all: only these (comma-separated registry names)")
    p_export.add_argument("--checkpoint-dir", help="with --all: use <dir>/<model>/checkpoint.pt when present")
    p_export.add_argument("--data-dir", help="Fashion-MNIST directory: real images for the parity check, and the "
                          "test set that --fp16 and --quantize need")
    p_export.add_argument("--max-batch-size", type=int, default=64, help="the config's max_batch_size (default 64)")
    p_export.add_argument("--fp16", action="store_true", help="also write a float16 version (measured on the test "
                          "set: needs it)")
    p_export.add_argument("--quantize", choices=["dynamic", "static"], help="also write an INT8 version (measured "
                          "on the test set: needs it; static calibrates on 512 of its images)")

    sub.add_parser("models", help="the registered models: family, parameters at 28x28x1 with 10 classes, CAM")
    return parser


def cmd_train(args: argparse.Namespace) -> None:
    from .config import load_config
    overrides = [*args.overrides, *(["progress=false"] if args.no_progress else [])]
    cfg = load_config(args.config, overrides)  # every key and value checked before any data loads
    from .runtime import world_size
    from .train import train
    metrics = train(cfg)
    if metrics:  # the main process: where the checkpoint is, and what to run next
        from pathlib import Path
        checkpoint = Path(cfg.out_dir) / "checkpoint.pt"
        print(f"checkpoint: {checkpoint}")
        print(f"next: python -m training export {checkpoint} --model-repository {DEFAULT_REPOSITORY}")
    if world_size() > 1:
        # DDP keeps the process group alive in C++ after destroy_process_group: its gloo threads are still running
        # at exit (pt_gloo_runloop, gloo_tcp_loop), and tearing them down with the interpreter has aborted a
        # finished run (SIGABRT, "terminate called without an active exception"). Every file is written and
        # closed by now, so a torchrun process leaves without that teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def cmd_models() -> None:
    import torch

    from .models import CamUnsupported, create_model, list_models, model_entry
    print(f"{'model':<14} {'family':<13} {'parameters':>12}  CAM")
    for name in list_models():
        with torch.device("meta"):  # counted without allocating (ResNet-152 is 58M parameters)
            model = create_model(name, in_channels=1, num_classes=10, input_size=(28, 28))
        try:
            model.cam_weights()
            cam = "yes"
        except CamUnsupported:
            cam = "no"
        print(f"{name:<14} {model_entry(name).family:<13} {sum(p.numel() for p in model.parameters()):>12,}  {cam}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .config import UsageError
    from .data import DatasetError
    try:
        if args.command == "train":
            cmd_train(args)
        elif args.command == "export":
            from .export import export_main
            export_main(args)
        elif args.command == "models":
            cmd_models()
    except (UsageError, DatasetError) as e:  # the user's to fix: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
