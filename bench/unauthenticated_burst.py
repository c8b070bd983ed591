"""What a caller with no credential can make a server hold: a burst of large (and gzip-compressed) ModelInfer
calls without a token against a real server process that requires one, measured as the server's resident
memory (VmRSS now, VmHWM the peak) before, during and after.

    python bench/unauthenticated_burst.py [--calls 24] [--mb 60] [--tree DIR]

It prints one table row per kind of burst; tests/server/test_front_door.py runs a smaller one and asserts
the bound.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serving.wire.inference import grpc_service_pb2 as pb  # noqa: E402
from serving.wire.inference import grpc_service_pb2_grpc as pb_grpc  # noqa: E402

TOKEN = "burst-bench-token-0123456789abcdef"


def memory_mb(pid: int) -> tuple[float, float]:
    """The process's resident memory now (psutil) and its peak since it started (MB)."""
    return psutil.Process(pid).memory_info().rss / 2**20, _high_water_mark_kb(pid) / 1024


def _high_water_mark_kb(pid: int) -> int:
    """Linux's exact peak resident size (VmHWM), which psutil does not report: a sampled peak could miss the
    burst's spike that the bound is about."""
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1])


class ServerProcess:
    """`python -m serving serve` on a free loopback port, requiring a token."""

    def __init__(self, repository: str | None = None, *flags: str, tree: Path = ROOT):
        self._tokens = tempfile.NamedTemporaryFile("w", suffix=".tokens", delete=False)
        self._tokens.write(TOKEN + "\n")
        self._tokens.close()
        cmd = [sys.executable, "-m", "serving", "serve", "--port", "0", "--auth-token-file", self._tokens.name,
               *(["--model-repository", repository] if repository else []), *flags]
        self.proc = subprocess.Popen(cmd, cwd=tree, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "CNN_SERVING_HTTP_PORT": "0"})  # no fixed REST port
        for line in self.proc.stdout:
            if line.startswith("SERVING"):
                self.address = line.split()[1]
                break
        else:
            raise RuntimeError(f"the server did not start (exit {self.proc.wait()})")

    def stop(self) -> str:
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=30)
        os.unlink(self._tokens.name)
        return out


@dataclass
class Burst:
    kind: str
    calls: int
    wire_mb: float
    codes: dict
    before_mb: float
    peak_mb: float
    after_mb: float


def big_request(mb: int) -> pb.ModelInferRequest:
    # Zeros: the worst case for gzip (about 1,000:1), so the most memory per byte on the wire.
    request = pb.ModelInferRequest(model_name="fashion_mnist")
    tensor = request.inputs.add(name="input", datatype="UINT8", shape=[mb * 1024 * 1024])
    del tensor
    request.raw_input_contents.append(bytes(mb * 1024 * 1024))
    return request


async def _burst(address: str, request: pb.ModelInferRequest, calls: int, compression) -> dict:
    codes: dict[str, int] = {}
    options = [("grpc.max_send_message_length", -1)]
    async with grpc.aio.insecure_channel(address, options=options, compression=compression) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        async def one():
            try:
                await stub.ModelInfer(request, timeout=60)
                code = "OK"
            except grpc.aio.AioRpcError as e:
                code = e.code().name
            codes[code] = codes.get(code, 0) + 1

        await asyncio.gather(*(one() for _ in range(calls)))
    return codes


def run_burst(server: ServerProcess, kind: str, calls: int, mb: int) -> Burst:
    compression = grpc.Compression.Gzip if kind == "gzip" else None
    request = big_request(mb)
    before, _ = memory_mb(server.proc.pid)
    codes = asyncio.run(_burst(server.address, request, calls, compression))
    time.sleep(1.0)
    after, peak = memory_mb(server.proc.pid)
    size = len(request.SerializeToString()) / 1e6
    wire = size / 1000 if compression else size  # gzip of zeros: about 1,000:1 (60 MB -> 60 KB)
    return Burst(kind, calls, round(wire * calls, 1), codes, before, peak, after)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=24)
    p.add_argument("--mb", type=int, default=60)
    p.add_argument("--model-repository", default=None)
    p.add_argument("--tree", type=Path, default=ROOT, help="run the server from another checkout (an earlier commit)")
    args = p.parse_args()
    print(f"{args.calls} concurrent ModelInfer calls of {args.mb} MB each, no token, against a server that "
          "requires one (one fresh server per row)\n")
    print("| burst | calls | on the wire | answers | RSS before | peak RSS | RSS after |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for kind in ("plain", "gzip"):
        server = ServerProcess(args.model_repository, tree=args.tree)
        try:
            b = run_burst(server, kind, args.calls, args.mb)
        finally:
            server.stop()
        answers = ", ".join(f"{n} {code}" for code, n in sorted(b.codes.items()))
        print(f"| {b.kind} | {b.calls} | {b.wire_mb:,.1f} MB | {answers} | {b.before_mb:,.0f} MB | "
              f"{b.peak_mb:,.0f} MB | {b.after_mb:,.0f} MB |")


if __name__ == "__main__":
    main()
