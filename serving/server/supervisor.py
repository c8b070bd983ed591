"""`serve --workers N`: N server processes on one port, supervised by this one.

One Python thread runs a server's event loop, and under many callers that thread, not the model, is the
ceiling (at 64 callers it sat at 100% while the process used 1.2 cores). Processes lift it, as gRPC's own
multiprocessing example, gunicorn or Triton's many front-end threads do:

- The ports (gRPC, and REST when on). The supervisor binds each first without SO_REUSEPORT, which fails when
  any other socket has it (so a port taken by another program is refused with one line, before a model
  loads), then sets SO_REUSEPORT on that socket and keeps it, bound and not listening, until it exits: the
  workers join it (gRPC and aiohttp bind with SO_REUSEPORT in a worker) and no other program can take the port
  meanwhile, even between workers. The kernel spreads new connections over the workers' listeners; one HTTP/2
  (or keep-alive HTTP/1.1) connection stays on one worker.
- The workers. Each is a whole server (`python -m serving.server.worker`): its repository, batchers,
  onnxruntime sessions and whatever ports a server listens on. onnxruntime's threads are divided among them
  (`--intra-op-threads 0`: the usable cores / N per worker). What spans them (management calls, statistics,
  polling) is in api/siblings.py. The supervisor answers SERVING once every worker serves.
- A worker that dies is started again (logged, after 0.5 s, doubling to 10 s while it keeps dying soon after
  its start); the others serve meanwhile. A worker that fails before the server first served stops the
  start, with exit code 2.
- SIGTERM (or SIGINT) is passed to every worker, which drains as one server would; the supervisor exits 0
  when every worker did. A second signal is passed on too: the workers exit at once.
- Metrics. The workers write their series to files (prometheus_client's multiprocess mode) and the
  supervisor serves `--metrics-port`, summing them.

Workers run in their own process group, so a terminal's Ctrl-C reaches the supervisor alone (which passes one
SIGTERM on); a worker whose supervisor is killed gets SIGTERM from the kernel and drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import pickle
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from prometheus_client import multiprocess

from ..engine.errors import StartRefused
from .access import TokenCheck, check_exposure
from .api.siblings import WorkerRole
from .connections import listen_address
from .metrics import MetricsEndpoint, workers_registry

log = logging.getLogger("serving.supervisor")

AUTO_LIMIT = 8            # `--workers auto`: one per usable core, at most this many
RESTART_FIRST_S = 0.5     # the wait before a dead worker is started again, doubling while it keeps dying
RESTART_MAX_S = 10.0
STEADY_S = 30.0           # a worker that ran this long before it died starts again after RESTART_FIRST_S
LAUNCH_FILE = "launch.pickle"
WORKER_MODULE = "serving.server.worker"


def usable_cores() -> int:
    """The cores this process may use: its CPU affinity, and its cgroup's CPU quota (a container's limit)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with contextlib.suppress(OSError, ValueError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    return cores


def resolve_workers(value: int | str) -> int:
    return min(usable_cores(), AUTO_LIMIT) if value == "auto" else int(value)


def hold_port(host: str, port: int) -> tuple[list[socket.socket], int]:
    """Bind host:port (every address it names) as a free port, then keep it for the workers to share; returns
    the sockets and the port (the one chosen where `port` is 0). StartRefused where it is taken."""
    address = listen_address(host, port)
    try:
        infos = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        raise StartRefused(f"cannot listen on {address}: the address is not this machine's") from None
    held: list[socket.socket] = []
    seen = set()
    try:
        for family, kind, proto, _, sockaddr in infos:
            if (family, sockaddr[0]) in seen:
                continue
            seen.add((family, sockaddr[0]))
            sock = socket.socket(family, kind, proto)
            held.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC: TIME_WAIT leftovers do not count
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # "::" is IPv4 too, as for gRPC
            sock.bind((sockaddr[0], port, *sockaddr[2:]))  # no SO_REUSEPORT yet: fails if anything has the port
            port = sock.getsockname()[1]
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # from now on the workers may join it
    except OSError:
        for sock in held:
            sock.close()
        raise StartRefused(f"cannot listen on {address}: the port is taken or the address is not this machine's") \
            from None
    return held, port


@dataclass
class Launch:
    """What every worker starts from (pickled into the supervisor's private directory)."""
    options: object  # app.ServerOptions; the port is the one held
    count: int
    log_level: str
    log_format: str
    event_loop: str


class Supervisor:
    def __init__(self, launch: Launch, directory: str):
        self.launch, self.directory = launch, directory
        self.count = launch.count
        self.metrics_dir = str(Path(directory) / "metrics")
        self.procs: list[asyncio.subprocess.Process | None] = [None] * self.count
        self.ready = [asyncio.Event() for _ in range(self.count)]
        self.started_at = [0.0] * self.count
        self.backoff = [RESTART_FIRST_S] * self.count
        self.serving = False        # every worker served once: from then on a dead worker is replaced
        self.stopping = False
        self.failed: tuple[int, int | None] | None = None
        self.changed = asyncio.Event()
        self.exits: dict[int, int] = {}
        self._tasks: set[asyncio.Task] = set()
        self._restarts: set[asyncio.Task] = set()

    def _task(self, coro, group: set | None = None) -> None:
        group = self._tasks if group is None else group
        task = asyncio.create_task(coro)
        group.add(task)
        task.add_done_callback(group.discard)

    async def _start(self, index: int) -> None:
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": self.metrics_dir}
        self.ready[index].clear()
        self.started_at[index] = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", WORKER_MODULE, self.directory, str(index), str(os.getpid()),
            stdout=asyncio.subprocess.PIPE, env=env, process_group=0)
        self.procs[index] = proc
        self._task(self._watch(index, proc))

    async def _watch(self, index: int, proc: asyncio.subprocess.Process) -> None:
        """Read the worker's stdout (its SERVING line; anything else is passed on), then see it end."""
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode(errors="replace")
            if line.startswith("SERVING ") and not self.ready[index].is_set():
                self.ready[index].set()
                if self.serving:
                    log.info("worker %d (pid %d) serving again", index, proc.pid)
                self.changed.set()
            else:
                sys.stdout.write(line)
                sys.stdout.flush()
        code = await proc.wait()
        self.ready[index].clear()
        with contextlib.suppress(OSError):
            multiprocess.mark_process_dead(proc.pid, self.metrics_dir)
        if self.stopping:
            self.exits[index] = code
        elif not self.serving:
            self.failed = self.failed or (index, code)
        else:
            ran = time.monotonic() - self.started_at[index]
            if ran > STEADY_S:
                self.backoff[index] = RESTART_FIRST_S
            wait = self.backoff[index]
            self.backoff[index] = min(RESTART_MAX_S, wait * 2)
            log.warning("worker %d (pid %d) exited with code %s after %.1fs; starting it again in %.1fs", index,
                        proc.pid, code, ran, wait)
            self._task(self._restart(index, wait), self._restarts)
        self.changed.set()

    async def _restart(self, index: int, wait: float) -> None:
        await asyncio.sleep(wait)
        if not self.stopping:
            await self._start(index)

    def _signal_all(self, signum: int = signal.SIGTERM) -> None:
        for proc in self.procs:
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signum)

    def _on_signal(self, signum: int) -> None:
        if not self.stopping:
            log.info("%s: every worker drains before exit (a second signal exits at once)",
                     signal.Signals(signum).name)
        self.stopping = True
        for task in self._restarts:  # a worker waiting to start again stays down
            task.cancel()
        self._signal_all()  # a second one: the workers exit at once
        self.changed.set()

    async def _until(self, done) -> None:
        while not done():
            self.changed.clear()
            await self.changed.wait()

    async def run(self, address: str) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        for index in range(self.count):
            await self._start(index)
        await self._until(lambda: self.stopping or self.failed or all(e.is_set() for e in self.ready))
        if self.failed and not self.stopping:
            index, code = self.failed
            self.stopping = True
            self._signal_all()
            await self._wait_all()
            raise StartRefused(f"worker {index} of {self.count} exited with code {code} before the server served "
                               "(its error is above)")
        if not self.stopping:
            self.serving = True
            log.info("serving on %s with %d workers (pids %s)", address, self.count,
                     ", ".join(str(p.pid) for p in self.procs if p))
            print(f"SERVING {address}", flush=True)
            await self._until(lambda: self.stopping)
        await self._wait_all()
        codes = [self.exits.get(i, 0) for i in range(self.count)]
        log.info("stopped: every worker exited (codes %s)", ", ".join(map(str, codes)))
        return 0 if all(code == 0 for code in codes) else 1

    async def _wait_all(self) -> None:
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


async def supervise(options, workers: int, log_level: str, log_format: str, event_loop: str) -> int:
    """Serve with `workers` processes until SIGTERM or SIGINT; 0 when every worker drained with nothing cut."""
    check_exposure(options.host, TokenCheck(options.inference_tokens, options.admin_tokens), options.tls,
                   options.allow_unauthenticated)
    if options.tls:  # the files are read here too, so that a missing one is one line, not one per worker
        options.tls.credentials()
    if not Path(options.repository).is_dir():
        raise StartRefused(f"model repository {options.repository} is not a directory")
    held, port = hold_port(options.host, options.port)
    http_port = options.http_port
    if http_port is not None:  # the REST port is held and shared the same way
        try:
            held_http, http_port = hold_port(options.host, http_port)
        except StartRefused as e:
            for sock in held:
                sock.close()
            raise StartRefused(f"{e} (--http-port)") from None
        held += held_http
    endpoint = None
    try:
        with tempfile.TemporaryDirectory(prefix="cnn-serving-") as directory:
            os.chmod(directory, 0o700)  # the private sockets and the launch (tokens) are this user's alone
            (Path(directory) / "metrics").mkdir()
            if options.metrics_port:
                endpoint = MetricsEndpoint(workers_registry(str(Path(directory) / "metrics")))
                await endpoint.serve(options.metrics_port, options.metrics_host)
            runtime = options.runtime
            if not runtime.intra_op_threads:  # the cores divided among the workers
                runtime = replace(runtime, intra_op_threads=max(1, usable_cores() // workers))
            worker_options = replace(options, port=port, http_port=http_port, reuse_port=True, metrics_port=0,
                                     runtime=runtime)
            launch = Launch(worker_options, workers, log_level, log_format, event_loop)
            path = Path(directory) / LAUNCH_FILE
            with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
                pickle.dump(launch, f)
            return await Supervisor(launch, directory).run(listen_address(options.host, port))
    finally:
        if endpoint is not None:
            await endpoint.close()
        for sock in held:
            sock.close()


def worker_role(directory: str, index: int) -> tuple[Launch, WorkerRole]:
    with open(Path(directory) / LAUNCH_FILE, "rb") as f:
        launch = pickle.load(f)
    return launch, WorkerRole(index=index, count=launch.count, directory=directory)
