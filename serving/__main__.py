"""Command line: `python -m serving serve|classify|explain|models|repository|batch ...`.

Each role registers its own commands: the client's and the batch job's work from the base install; `serve`
needs the `[server]` extra.
"""

from __future__ import annotations

import argparse
import sys

import grpc

from .cli_support import prog_name
from .client import cli as client_cli
from .client.connection import SetupError
from .jobs import cli as jobs_cli
from .server import cli as server_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog_name("serving"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    server_cli.add_subcommands(sub)
    client_cli.add_subcommands(sub)
    jobs_cli.add_subcommands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except (SetupError, client_cli.UsageError) as e:  # a file that cannot be read, a class that does not exist
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
