"""`python -m serving batch`: classify a whole data set to JSONL/CSV, resumable, with a summary.

    python -m serving batch --idx-images t10k-images-idx3-ubyte.gz --idx-labels t10k-labels-idx1-ubyte.gz \\
        --server host1:8001,host2:8001 --output preds.jsonl --cam-dir cams --cam-mistakes-only

Inputs: an IDX pair, an .npz (`images` uint8 [N, H, W(, C)], optional `labels`), a folder of images (one
subfolder per class gives labels) or a CSV/text list of paths (optional second column: the label).
Rows are appended as answers arrive: run the same command again after an interruption and it goes on
where it stopped. The output records the model and version that wrote it (`<output>.job.json`); resuming
it with another is refused (exit code 2) unless --fresh discards it. At the end a summary (accuracy,
per-class precision and recall, a confusion matrix and a contact sheet of the most confident mistakes)
lands next to the output.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from ..cli_support import non_negative_int, positive_int
from ..client import connection
from ..engine.inference import MAX_IMAGES_PER_REQUEST
from . import grpc_engine
from .errors import BatchError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", nargs="?", help="a folder of images (subfolders = classes), an .npz, a .csv/.txt "
                   "list (path[,label] per line), a .parquet (column image or path, optional id and label) or an "
                   "IDX images file")
    p.add_argument("--engine", choices=["grpc", "ray"], default="grpc", help="grpc: stream to running servers "
                   "(the deployed fleet); ray: an actor pool loads the model itself, next to the data "
                   "(the [ray] extra)")
    p.add_argument("--idx-images", help="IDX images file (.gz or not), e.g. t10k-images-idx3-ubyte.gz")
    p.add_argument("--idx-labels", help="IDX labels file matching --idx-images")
    p.add_argument("--server", default="127.0.0.1:8001", help="host:port, comma-separated for several "
                   "replicas (one stream each, requests dealt round robin)")
    p.add_argument("--model", default="", help="model name (default: the only one served)")
    p.add_argument("--model-version", type=non_negative_int, default=0, help="model version (default 0: the "
                   "newest its version policy serves)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds a call (or a silent stream) may take")
    p.add_argument("-o", "--output", default="predictions.jsonl", help="JSONL, CSV when it ends in .csv, or a "
                   "folder of Parquet parts when it ends in .parquet; an existing output is resumed")
    p.add_argument("--batch-size", type=int, default=64, help="images per request (gRPC) or per onnxruntime run (Ray)")
    p.add_argument("--window", type=int, default=8, help="requests in flight per stream")
    p.add_argument("--top-k", type=positive_int, default=5, help="predictions kept per image (default 5)")
    p.add_argument("--cam-dir", help="write a CAM overlay PNG per image here (via Explain)")
    p.add_argument("--cam-mistakes-only", action="store_true", help="CAM overlays only for misclassified images")
    p.add_argument("--sheet-size", type=int, default=16, help="mistakes on the contact sheet")
    p.add_argument("--fresh", action="store_true", help="discard an existing output (its rows, record and "
                   "report) and start again; without it an existing output is resumed, and refused when another "
                   "model or version wrote it")
    p.add_argument("--stop-after", type=int, help="classify at most this many images now, then stop (resumable)")
    p.add_argument("--retries", type=int, default=3, help="retries of a request or stream on UNAVAILABLE/busy")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it is off by itself when stderr "
                   "is not a terminal)")
    connection.add_arguments(p)
    ray = p.add_argument_group("Ray engine (--engine ray)")
    ray.add_argument("--model-repository", default="", help="the repository the actors load the model from; "
                     "every node must read it (default: the bundled one, in a checkout)")
    ray.add_argument("--ray-address", default="", help="a Ray cluster to join (`auto`, or ray://host:10001); "
                     "default: a local Ray on this machine")
    ray.add_argument("--num-actors", type=int, default=0, help="actors in the pool (default: one per "
                     "--threads-per-actor CPUs of the cluster, or with --gpus-per-actor one per that many GPUs)")
    ray.add_argument("--gpus-per-actor", type=float, default=0, help="GPUs each actor takes (then it runs on CUDA)")
    ray.add_argument("--threads-per-actor", type=int, default=1, help="onnxruntime threads of each actor, and the "
                     "CPUs it takes from Ray (default 1)")


# Flags only one engine reads, with their defaults: given to the other engine they would be silently ignored.
_GRPC_ONLY = {"server": "127.0.0.1:8001", "window": 8, "retries": 3, "cam_dir": None, "cam_mistakes_only": False,
              "tls": False, "tls_ca": "", "tls_cert": "", "tls_key": "", "token_file": ""}
_RAY_ONLY = {"model_repository": "", "ray_address": "", "num_actors": 0, "gpus_per_actor": 0,
             "threads_per_actor": 1}


def _other_engines_flags(args: argparse.Namespace) -> list[str]:
    """The flags given that the chosen engine does not read, as the user spelled them (--ray-address)."""
    other = _RAY_ONLY if args.engine == "grpc" else _GRPC_ONLY
    return ["--" + dest.replace("_", "-") for dest, default in other.items() if getattr(args, dest) != default]


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or args.window < 1:
        print("error: --batch-size and --window must be at least 1", file=sys.stderr)
        return 2
    if args.batch_size > MAX_IMAGES_PER_REQUEST:
        print(f"error: --batch-size {args.batch_size}: a request holds at most {MAX_IMAGES_PER_REQUEST} images",
              file=sys.stderr)
        return 2
    if args.num_actors < 0 or args.threads_per_actor < 1 or args.gpus_per_actor < 0:
        print("error: --num-actors must be at least 0 (0: the default), --threads-per-actor at least 1 and "
              "--gpus-per-actor at least 0", file=sys.stderr)
        return 2
    wrong = _other_engines_flags(args)
    if wrong:
        print(f"error: {', '.join(wrong)} {'does' if len(wrong) == 1 else 'do'} nothing with --engine {args.engine}",
              file=sys.stderr)
        return 2
    try:
        if args.engine == "ray":
            from . import ray_engine  # loads the server's model code: only with --engine ray
            return ray_engine.run_job(args)
        return asyncio.run(grpc_engine.run_job(args))
    except BatchError as e:  # exit 2 for the user's mistakes (InputError, OutputOfAnotherModel), else 1
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command again to resume", file=sys.stderr)
        return 130


def add_subcommands(subparsers) -> None:
    p = subparsers.add_parser("batch", help="classify a whole data set (IDX, npz, folder, list, Parquet) to "
                              "JSONL/CSV/Parquet, through servers or on Ray",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)
