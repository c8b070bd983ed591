"""The end of the drain: the server's client connections closed at the socket, before gRPC stops.

gRPC's own stop (`grpc.aio.Server.stop`) sends GOAWAY, but first it cancels every call it has received and
not yet handed to a handler, and cancels each call that reaches it before its client has read the GOAWAY:
a client that sends its next call in the last milliseconds sees CANCELLED, which no client retries. Python
gRPC has no way to send GOAWAY while the server still serves. A TCP connection that closes, though, ends
every call still open on it UNAVAILABLE on the client's side ("Socket closed"), which clients retry, and the
server holds nothing of those calls: the drain only cuts once every admitted call has been answered.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("serving.server")

_FDS = "/proc/self/fd"


def cut_connections(port: int) -> int:
    """Shut down, both ways, every TCP connection this process accepted on `port` (the listening socket is
    left to gRPC's stop). Returns how many were cut; 0 where the process's descriptors cannot be listed (not
    Linux), and then gRPC's stop alone ends them."""
    try:
        fds = [int(name) for name in os.listdir(_FDS)]
    except OSError:
        return 0
    cut = 0
    for fd in fds:
        try:
            if not os.readlink(f"{_FDS}/{fd}").startswith("socket:"):
                continue
            sock = socket.socket(fileno=os.dup(fd))  # a duplicate: closing it leaves gRPC's descriptor open
        except OSError:
            continue
        with sock:
            try:
                if (sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM
                        or sock.getsockname()[1] != port):
                    continue
                sock.getpeername()  # raises on the listening socket, which has no peer
                # shutdown() acts on the connection itself, shared by every descriptor of it: the client reads
                # what was already written (answers, refusals), then the end of the connection.
                sock.shutdown(socket.SHUT_RDWR)
                cut += 1
            except OSError:
                continue
    return cut
