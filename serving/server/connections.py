"""Client connections: the bounds on them, all on by default; the address the server listens on; and the end
of the drain, when the port and the connections are closed at the socket before gRPC stops.

Bounds. A connection costs a file descriptor and gRPC core's buffers whether or not it ever makes a call, so a
server that never bounds them can be exhausted by idle sockets alone (20,000 idle connections took every
descriptor and a legitimate call then timed out). Each bound maps onto a gRPC core channel argument; the
counterparts in Triton and Envoy are given with each default in docs/security.md.

The end of the drain. gRPC's own stop (`grpc.aio.Server.stop`) sends GOAWAY, but first it cancels every call
it has received and not yet handed to a handler, and cancels each call that reaches it before its client has
read the GOAWAY: a client that sends its next call in the last milliseconds sees CANCELLED, which no client
retries. Python gRPC has no way to send GOAWAY while the server still serves. A TCP connection that closes,
though, ends every call still open on it UNAVAILABLE on the client's side ("Socket closed"), which clients
retry, and the server holds nothing of those calls: the drain only cuts once every admitted call has been
answered.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
from dataclasses import dataclass

log = logging.getLogger("serving.connections")

# Descriptors kept for what the server itself opens (model files, the metrics port, onnxruntime's files).
RESERVED_FDS = 256
_FDS = "/proc/self/fd"


@dataclass
class ConnectionLimits:
    max_connections: int = 4096          # open client connections; more are refused by gRPC core at accept
    max_concurrent_streams: int = 1024   # calls open at once on one connection; more are refused (REFUSED_STREAM)
    idle_s: float = 300.0                # a connection with no call for this long is closed (GOAWAY)
    age_s: float = 1800.0                # any connection is asked to reconnect after this (GOAWAY, ±10% jitter)
    age_grace_s: float = 0.0             # then its calls may take this long before it is cut (0 = no limit)
    handshake_timeout_s: float = 10.0    # a connection must complete TLS and the HTTP/2 preface in this time

    def grpc_options(self) -> list[tuple[str, int]]:
        options = [("grpc.max_concurrent_streams", self.max_concurrent_streams), ("grpc.http2.bdp_probe", 0),
                   ("grpc.server_handshake_timeout_ms", _ms(self.handshake_timeout_s))]
        if self.max_connections > 0:
            options.append(("grpc.max_allowed_incoming_connections", self.max_connections))
        if self.idle_s > 0:
            options.append(("grpc.max_connection_idle_ms", _ms(self.idle_s)))
        if self.age_s > 0:  # clients behind an L4 balancer reconnect, and spread over new replicas
            options.append(("grpc.max_connection_age_ms", _ms(self.age_s)))
        if self.age_grace_s > 0:
            options.append(("grpc.max_connection_age_grace_ms", _ms(self.age_grace_s)))
        return options

    def check_file_limit(self) -> None:
        """Raise the process's descriptor limit to its hard limit, and lower the connection cap to fit under it
        (with a log line), so the cap is reached before the descriptors run out."""
        if sys.platform == "win32" or self.max_connections <= 0:
            return
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = self.max_connections + RESERVED_FDS
        if soft != resource.RLIM_INFINITY and soft < wanted:
            new_soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))
                soft = new_soft
            except (ValueError, OSError):
                pass
        if soft != resource.RLIM_INFINITY and soft < wanted:
            fitted = max(soft - RESERVED_FDS, 16)
            log.warning("--max-connections %d does not fit the descriptor limit %d: capping connections at %d",
                        self.max_connections, soft, fitted)
            self.max_connections = fitted


def _ms(seconds: float) -> int:
    return max(int(seconds * 1000), 1)


def listen_address(host: str, port: int) -> str:
    """host:port as gRPC wants it: an IPv6 address in brackets ("::1" -> "[::1]:8001")."""
    host = host.strip("[]")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ConnectionWatch:
    """A log line when the connection cap is reached (gRPC core refuses the extra connections silently), and
    one when it is left. Open descriptors stand in for connections: a listing of /proc/self/fd, once a second,
    costs well under a millisecond."""

    def __init__(self, cap: int, interval_s: float = 1.0):
        self.cap, self.interval_s = cap, interval_s
        self.baseline = _open_fds()
        self.at_cap = False
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self.cap > 0 and self.baseline is not None:
            self._task = asyncio.create_task(self._watch(), name="connection-watch")

    def stop(self) -> None:
        if self._task:
            self._task.cancel()
            self._task = None

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            fds = _open_fds()
            if fds is None:
                return
            connections = fds - self.baseline
            if not self.at_cap and connections >= self.cap:
                self.at_cap = True
                log.warning("connection cap reached: about %d connections open, new ones are refused until some "
                            "close (--max-connections %d; idle ones close after --grpc-max-connection-idle)",
                            connections, self.cap)
            elif self.at_cap and connections < self.cap * 0.9:
                self.at_cap = False
                log.info("below the connection cap again: about %d connections open", connections)


def _open_fds() -> int | None:
    try:
        return len(os.listdir(_FDS))
    except OSError:  # not Linux: no watch, the cap itself still holds
        return None

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
