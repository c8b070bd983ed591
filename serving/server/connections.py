"""The end of the drain: the port and the server's client connections closed at the socket, before gRPC stops.

gRPC's own stop (`grpc.aio.Server.stop`) sends GOAWAY, but first it cancels every call it has received and
not yet handed to a handler, and cancels each call that reaches it before its client has read the GOAWAY:
a client that sends its next call in the last milliseconds sees CANCELLED, which no client retries. Python
gRPC has no way to send GOAWAY while the server still serves. A TCP connection that closes, though, ends
every call still open on it UNAVAILABLE on the client's side ("Socket closed"), which clients retry, and the
server holds nothing of those calls: the drain only cuts once every admitted call has been answered.
"""

from __future__ import annotations

import os
import socket

_FDS = "/proc/self/fd"


def cut_connections(port: int) -> int:
    """Stop listening on `port`, then shut down, both ways, every TCP connection this process accepted there.
    Returns how many connections were cut; 0 where the process's descriptors cannot be listed (not Linux), and
    then gRPC's stop alone ends them.

    The port is closed first: a client whose connection is cut reconnects at once, and a connection accepted
    in the moment before gRPC's stop would take calls that gRPC then cancels. A connection attempt now finds
    the port closed (UNAVAILABLE, "failed to connect"). gRPC logs the end of its listener once ("Closing
    acceptor. Failed accept4: Invalid argument"), and its stop then finds nothing left to close."""
    listening, connected = [], []
    for sock in _sockets_on(port):
        try:
            sock.getpeername()
            connected.append(sock)
        except OSError:  # no peer: the listening socket
            listening.append(sock)
    cut = 0
    for group in (listening, connected):
        for sock in group:
            with sock:
                try:
                    # shutdown() acts on the socket itself, shared by every descriptor of it (gRPC's too): the
                    # listener stops taking connections; a connection's client reads what was already written
                    # (answers, refusals), then its end.
                    sock.shutdown(socket.SHUT_RDWR)
                    cut += group is connected
                except OSError:
                    continue
    return cut


def _sockets_on(port: int) -> list[socket.socket]:
    """Duplicates of this process's TCP sockets bound to `port` (closing one leaves the original open)."""
    try:
        fds = [int(name) for name in os.listdir(_FDS)]
    except OSError:
        return []
    found = []
    for fd in fds:
        try:
            if not os.readlink(f"{_FDS}/{fd}").startswith("socket:"):
                continue
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        try:
            if (sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM
                    and sock.getsockname()[1] == port):
                found.append(sock)
                continue
        except OSError:
            pass
        sock.close()
    return found
