"""`python -m serving repository {index,load,unload}`: repository control over the KServe v2 API.

Talks to any server of that protocol (this one or Triton in explicit model-control mode) through the
stubs generated from proto/inference, so the command needs no Triton client installed.
"""

from __future__ import annotations

import argparse
import json

from ..wire.inference import grpc_service_pb2 as pb
from ..wire.inference import grpc_service_pb2_grpc as pb_grpc
from . import connection


class _Repository:
    """The KServe repository RPCs over one channel, with the command's TLS and token (load and unload need an
    admin token on a server that has tokens)."""

    def __init__(self, args: argparse.Namespace):
        tls, token = connection.from_arguments(args)
        self.channel = connection.channel(args.server, [], tls)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
        self.call = dict(timeout=args.timeout, metadata=connection.call_metadata(token))

    def __enter__(self) -> _Repository:
        return self

    def __exit__(self, *exc) -> None:
        self.channel.close()


def cmd_index(args: argparse.Namespace) -> int:
    with _Repository(args) as repo:
        response = repo.stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=args.ready), **repo.call)
    rows = [(m.name, m.version or "-", m.state or "-", m.reason) for m in response.models]
    if args.json:
        for name, version, state, reason in rows:
            print(json.dumps({"name": name, "version": version, "state": state, "reason": reason}))
        return 0
    if not rows:
        print("no models")
        return 0
    widths = [max(len(r[i]) for r in rows + [("MODEL", "VERSION", "STATE", "")]) for i in range(3)]
    for name, version, state, reason in [("MODEL", "VERSION", "STATE", "REASON"), *rows]:
        print(f"{name:<{widths[0]}}  {version:<{widths[1]}}  {state:<{widths[2]}}  {reason}".rstrip())
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    with _Repository(args) as repo:
        # Loading warms the model up, which can take longer than a query: the deadline is the caller's.
        repo.stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=args.model), **repo.call)
    print(json.dumps({"name": args.model, "state": "loaded"}) if args.json else f"{args.model}: loaded")
    return 0


def cmd_unload(args: argparse.Namespace) -> int:
    with _Repository(args) as repo:
        repo.stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=args.model), **repo.call)
    print(json.dumps({"name": args.model, "state": "unloaded"}) if args.json else f"{args.model}: unloaded")
    return 0


def add_subcommand(subparsers) -> None:
    parser = subparsers.add_parser("repository", help="list, load or unload models of a running server")
    actions = parser.add_subparsers(dest="action", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--server", default="127.0.0.1:8001", help="host:port of the gRPC server")
        p.add_argument("--timeout", type=float, default=60.0, help="deadline, seconds (default 60)")
        p.add_argument("--json", action="store_true", help="one JSON object per line")
        connection.add_arguments(p)

    p = actions.add_parser("index", help="every model directory and version with its state and reason")
    common(p)
    p.add_argument("--ready", action="store_true", help="only the versions that serve")
    p.set_defaults(func=cmd_index)
    for name, func, text in (("load", cmd_load, "load or reload a model (its versions per the version policy)"),
                             ("unload", cmd_unload, "stop serving a model (queued requests finish first)")):
        p = actions.add_parser(name, help=text)
        common(p)
        p.add_argument("model")
        p.set_defaults(func=func)
