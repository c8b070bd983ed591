"""`python -m serving health`: ask a server's standard gRPC health service whether it serves (exit 0) or not.

For container health checks and scripts; it needs only the base install. The two messages of
grpc.health.v1 are one optional field each, so they are written and read here by hand rather than
through a generated stub the base install would have to carry.
"""

from __future__ import annotations

import argparse
import sys

import grpc

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
    tls, _ = connection.from_arguments(args)
    try:
        status = check(args.server, args.service, args.timeout, tls)
    except grpc.RpcError as e:
        print(f"{args.server}: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    print(f"{args.server}: {status}")
    return 0 if status == "SERVING" else 1


def add_subcommand(subparsers) -> None:
    p = subparsers.add_parser("health", help="exit 0 when the server's gRPC health service says SERVING")
    p.add_argument("--server", default="127.0.0.1:8001", help="host:port")
    p.add_argument("--service", default="", help="one service's status (default: the whole server)")
    p.add_argument("--timeout", type=float, default=3.0, help="deadline, seconds")
    connection.add_arguments(p)
    p.set_defaults(func=cmd_health)
