"""`python -m serving health`: ask a server's standard gRPC health service whether it serves (exit 0) or not.

For container health checks and scripts; it needs only the base install. The two messages of
grpc.health.v1 are one optional field each, so they are written and read here by hand rather than
through a generated stub the base install would have to carry.
"""

from __future__ import annotations

import argparse
import json
import sys

import grpc

from ..cli_support import comma_list
from . import connection

CHECK = "/grpc.health.v1.Health/Check"
STATUS_NAMES = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


def _request(service: str) -> bytes:
    name = service.encode()
    if len(name) > 127:
        raise ValueError("service name longer than 127 bytes")
    return b"\x0a" + bytes([len(name)]) + name if name else b""  # field 1, length-delimited


def _status(response: bytes) -> int:
    return response[1] if len(response) >= 2 and response[0] == 0x08 else 0  # field 1, varint (0 when absent)


def check(target: str, service: str = "", timeout_s: float = 3.0, tls: connection.Tls | None = None) -> str:
    """The health status name of `service` ("" = the whole server) at `target`."""
    with connection.channel(target, [], tls) as ch:
        call = ch.unary_unary(CHECK, request_serializer=None, response_deserializer=None)
        return STATUS_NAMES.get(_status(call(_request(service), timeout=timeout_s)), "UNKNOWN")


def cmd_health(args: argparse.Namespace) -> int:
    """Every server's status, one line each; exit 0 only when all of them serve."""
    tls, _ = connection.from_arguments(args)
    serving = True
    for server in args.server:
        try:
            status, error = check(server, args.service, args.timeout, tls), ""
        except grpc.RpcError as e:
            status, error = e.code().name, e.details() or ""
        serving = serving and status == "SERVING"
        if args.json:
            print(json.dumps({"server": server, "status": status, **({"error": error} if error else {})}))
        elif error:
            print(f"{server}: {status}: {error}", file=sys.stderr)
        else:
            print(f"{server}: {status}")
    return 0 if serving else 1


def add_subcommand(subparsers) -> None:
    p = subparsers.add_parser("health", help="exit 0 when the server's gRPC health service says SERVING")
    p.add_argument("--server", type=comma_list, default=["127.0.0.1:8001"],
                   help="host:port, comma-separated for several: exit 0 only when every one serves "
                   "(default 127.0.0.1:8001)")
    p.add_argument("--service", default="", help="one service's status (default: the whole server)")
    p.add_argument("--timeout", type=float, default=3.0, help="deadline, seconds (default 3)")
    p.add_argument("--json", action="store_true", help="one JSON object per server")
    connection.add_arguments(p)
    p.set_defaults(func=cmd_health)
