"""Connection floods against a real server process, and what a legitimate caller sees meanwhile:

- idle: N connections that send the HTTP/2 preface and SETTINGS, then nothing; the server's open descriptors
  after, and a Classify on a connection opened before the flood and on one opened during it;
- reset: one connection opening streams and resetting them at once (HEADERS + RST_STREAM) for a few seconds,
  while a caller on another connection classifies in a loop: its calls and their median latency, against
  the same loop with no flood.

    python bench/front_door.py [--tree DIR] [--idle 6000] [flags passed to serve ...]

`--tree` runs the server from another checkout (to compare with an earlier commit).
"""

from __future__ import annotations

import argparse
import multiprocessing
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import h2.config
import h2.connection
import h2.exceptions
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serving_bench import start_process, stop_process  # noqa: E402
from serving.client import ClassifierClient  # noqa: E402

IMAGE = np.zeros((28, 28), np.uint8)
INFER = b"/inference.GRPCInferenceService/ModelInfer"


def h2_connection(port: int) -> tuple[socket.socket, h2.connection.H2Connection]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    return sock, conn


def classify_loop(address: str, seconds: float) -> tuple[int, int, float]:
    """(calls answered, calls failed, median ms) of a Classify loop on one connection."""
    ok = failed = 0
    latencies = []
    with ClassifierClient(address, retries=0, timeout_s=5) as client:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t = time.perf_counter()
            try:
                client.classify([IMAGE])
                ok += 1
                latencies.append(time.perf_counter() - t)
            except Exception:  # noqa: BLE001 - counted, whatever the failure
                failed += 1
    return ok, failed, statistics.median(latencies) * 1000 if latencies else float("nan")


def flood_resets(port: int, seconds: float, sent) -> None:
    """Open streams and reset them at once, for `seconds`; runs in a process of its own, so that the flood's
    CPU is not taken from the measured caller's process."""
    end = time.monotonic() + seconds
    try:
        sock, conn = h2_connection(port)
        sock.settimeout(0.001)
        headers = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", INFER),
                   (b":authority", b"127.0.0.1"), (b"content-type", b"application/grpc"), (b"te", b"trailers")]
        while time.monotonic() < end:
            for _ in range(100):
                stream_id = conn.get_next_available_stream_id()
                conn.send_headers(stream_id, headers)
                conn.reset_stream(stream_id)
                sent.value += 1
            sock.sendall(conn.data_to_send())
            try:
                conn.receive_data(sock.recv(1 << 20))
            except (TimeoutError, BlockingIOError):
                pass
    except (OSError, h2.exceptions.ProtocolError):
        pass  # the server closed the connection


def reset_flood(address: str, seconds: float) -> tuple[int, tuple[int, int, float]]:
    port = int(address.rsplit(":", 1)[1])
    sent = multiprocessing.Value("q", 0, lock=False)
    attacker = multiprocessing.Process(target=flood_resets, args=(port, seconds, sent), daemon=True)
    attacker.start()
    try:
        served = classify_loop(address, seconds)
    finally:
        attacker.join(seconds + 10)
    return sent.value, served


def idle_flood(proc: subprocess.Popen, address: str, count: int) -> dict:
    port = int(address.rsplit(":", 1)[1])
    fds = psutil.Process(proc.pid).num_fds
    before = fds()
    with ClassifierClient(address, retries=0, timeout_s=5) as early:
        early.classify([IMAGE])
        held, refused = [], 0
        for _ in range(count):
            try:
                held.append(h2_connection(port)[0])
            except OSError:
                refused += 1
        time.sleep(3)
        after = fds()
        outcome = {}
        for name, call in (("connected before", lambda: early.classify([IMAGE])),
                           ("new connection", lambda: ClassifierClient(address, retries=0, timeout_s=5).classify([IMAGE]))):
            try:
                call()
                outcome[name] = "OK"
            except Exception as error:  # noqa: BLE001 - the status is the figure
                code = error.code() if hasattr(error, "code") else None
                outcome[name] = code.name if code is not None else type(error).__name__
        for s in held:
            s.close()
    return {"opened": len(held), "refused at connect": refused, "server descriptors": f"{before} -> {after}",
            **outcome}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tree", type=Path, default=ROOT)
    p.add_argument("--idle", type=int, default=6000)
    p.add_argument("--seconds", type=float, default=3.0)
    args, flags = p.parse_known_args()
    proc, address = start_process(["-m", "serving", "serve", "--port", "0", *flags], cwd=args.tree)
    try:
        print(f"server from {args.tree}, {' '.join(flags) or 'default flags'}")
        quiet = classify_loop(address, args.seconds)
        sent, flooded = reset_flood(address, args.seconds)
        print("| Classify loop | calls answered | failed | median ms |")
        print("|---|---:|---:|---:|")
        print(f"| alone | {quiet[0]:,} | {quiet[1]} | {quiet[2]:.2f} |")
        print(f"| during a reset flood ({sent:,} streams opened and reset) | {flooded[0]:,} | {flooded[1]} | "
              f"{flooded[2]:.2f} |")
        print()
        idle = idle_flood(proc, address, args.idle)
        print("| idle connections | " + " | ".join(idle) + " |")
        print("|---|" + "---|" * len(idle))
        print(f"| {args.idle:,} | " + " | ".join(str(v) for v in idle.values()) + " |")
    finally:
        stop_process(proc)


if __name__ == "__main__":
    main()
