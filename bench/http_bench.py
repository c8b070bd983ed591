"""REST against gRPC on the same server, in one run, with the same small-net request as binary tensors
(FP32 [1, 1, 28, 28] in, `logits` out), and both against PyTriton's HTTP front end.

    python bench/http_bench.py                                   # 64 callers, the project's load generators
    python bench/http_bench.py --concurrency 1,8,64 --perf-analyzer --pytriton-python /path/to/venv/bin/python \
        --out bench/results/cpu_http.md

Rows, for each concurrency, all against one server process (the bundled repository):
- gRPC: KServe ModelInfer bytes on one grpc.aio channel (serving_bench.drive);
- REST: the same tensor as Triton's binary tensor extension, aiohttp with one connection per caller;
- with --perf-analyzer: Triton's perf_analyzer `-i grpc` and `-i http` (bench/perf_analyzer.py sets it up);
- with --pytriton-python: PyTriton (Triton's own HTTP front end and dynamic batcher, onnxruntime on the same
  ONNX file) measured by perf_analyzer `-i http` and by the same REST load generator.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving_bench import LoadResult, _kserve_request, drive, process_cpu_s, start_process, stop_process  # noqa: E402

METHOD = "/inference.GRPCInferenceService/ModelInfer"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rest_request(channels: int, size: int) -> tuple[bytes, dict[str, str]]:
    """The REST body of the same tensor _kserve_request sends over gRPC (seeded alike), binary in and out."""
    x = np.random.default_rng(0).random((1, channels, size, size), dtype=np.float32)
    header = orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                       "parameters": {"binary_data_size": x.nbytes}}],
                           "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]})
    return header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header)),
                                  "Content-Type": "application/octet-stream"}


async def drive_http(url: str, body: bytes, headers: dict, concurrency: int, seconds: float,
                     server_pid: int | None = None) -> LoadResult:
    """`concurrency` callers, each on its own keep-alive connection, posting `body` back to back."""
    import aiohttp
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        latencies: list[float] = []
        errors = 0

        async def once() -> bool:
            async with session.post(url, data=body, headers=headers) as r:
                await r.read()
                return r.status == 200

        assert await once(), f"{url} refused the request"
        stop_at = time.perf_counter() + seconds

        async def caller() -> None:
            nonlocal errors
            while time.perf_counter() < stop_at:
                t = time.perf_counter()
                try:
                    ok = await once()
                except aiohttp.ClientError:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - t)
                else:
                    errors += 1

        cpu = (process_cpu_s(server_pid) if server_pid else float("nan"), time.process_time())
        started = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        server_cpu = process_cpu_s(server_pid) - cpu[0] if server_pid else float("nan")
        client_cpu = time.process_time() - cpu[1]
    lat = np.array(latencies) * 1000 if latencies else np.array([float("nan")])
    n = max(1, len(latencies))
    return LoadResult(len(latencies) / elapsed, len(latencies) / elapsed, float(np.percentile(lat, 50)),
                      float(np.percentile(lat, 99)), errors, None if server_cpu != server_cpu else 1000 * server_cpu / n,
                      1000 * client_cpu / n)


def _row(server: str, tool: str, clients: int, r: LoadResult | dict) -> dict:
    if isinstance(r, dict):  # perf_analyzer's
        return {"server": server, "tool": tool, "clients": clients, "rps": r["infer_per_s"], "p50": r["p50_ms"],
                "p99": r["p99_ms"], "note": r["server"]}
    cpu = f"server CPU {r.server_cpu_ms:.2f} ms/req" if r.server_cpu_ms is not None else ""
    return {"server": server, "tool": tool, "clients": clients, "rps": r.requests_per_s, "p50": r.p50_ms,
            "p99": r.p99_ms, "note": f"{r.errors} errors; {cpu}"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/http_bench.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-repository", default=str(ROOT / "model_repository"))
    p.add_argument("--model", default="fashion_mnist")
    p.add_argument("--concurrency", default="64")
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--perf-analyzer", action="store_true", help="add perf_analyzer rows (-i grpc and -i http)")
    p.add_argument("--pytriton-python", help="a Python with nvidia-pytriton and onnxruntime: add PyTriton's rows")
    p.add_argument("--out", help="also write the table here")
    args = p.parse_args(argv)
    concurrency = [int(c) for c in args.concurrency.split(",")]
    body, headers = rest_request(1, 28)
    payload = _kserve_request(args.model, 1, 28)
    pa = None
    if args.perf_analyzer or args.pytriton_python:
        import perf_analyzer as pa_module
        home = ROOT / ".perf_analyzer"
        pa = (pa_module, pa_module.perf_analyzer_command(home, pa_module.setup(home)))
    rows = []
    http_port = free_port()
    server, address = start_process(["-m", "serving", "serve", "--model-repository", args.model_repository,
                                     "--port", "0", "--http-port", str(http_port), "--log-level", "WARNING"],
                                    env={**os.environ, "PYTHONPATH": str(ROOT)})
    rest = f"127.0.0.1:{http_port}"
    try:
        for c in concurrency:
            rows.append(_row("ours", "gRPC (grpc.aio, KServe ModelInfer)", c,
                             asyncio.run(drive(address, METHOD, payload, 1, c, args.seconds, server.pid))))
            rows.append(_row("ours", "REST (aiohttp, binary tensors)", c, asyncio.run(drive_http(
                f"http://{rest}/v2/models/{args.model}/infer", body, headers, c, args.seconds, server.pid))))
            if pa and args.perf_analyzer:
                for protocol, url in (("grpc", address), ("http", rest)):
                    rows.append(_row("ours", f"perf_analyzer -i {protocol}", c, pa[0].run_perf_analyzer(
                        pa[1], url, args.model, c, args.seconds, 10, protocol=protocol)))
    finally:
        stop_process(server)
    if args.pytriton_python:
        python = Path(args.pytriton_python)
        env = {**os.environ, "LD_LIBRARY_PATH": f"{python.resolve().parent.parent / 'lib'}:"
               f"{Path(sys.base_prefix) / 'lib'}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
        grpc_port, pt_http = free_port(), free_port()
        script = ROOT / "bench" / "pytriton_server.py"
        repo = Path(args.model_repository)
        from serving.repository_format import read_config
        max_batch = read_config(repo / args.model).max_batch_size
        proc, _ = start_process([str(script), str(repo / args.model), args.model, str(grpc_port), str(max_batch),
                                 str(pt_http)], python=str(python), env=env)
        try:
            for c in concurrency:
                rows.append(_row("PyTriton", "perf_analyzer -i http", c, pa[0].run_perf_analyzer(
                    pa[1], f"127.0.0.1:{pt_http}", args.model, c, args.seconds, 10, protocol="http")))
                rows.append(_row("PyTriton", "REST (aiohttp, binary tensors)", c, asyncio.run(drive_http(
                    f"http://127.0.0.1:{pt_http}/v2/models/{args.model}/infer", body, headers, c, args.seconds,
                    proc.pid))))
        finally:
            stop_process(proc)
    lines = ["| server | load generator | callers | req/s | p50 ms | p99 ms | notes |", "|---|---|---:|---:|---:|---:|---|"]
    lines += [f"| {r['server']} | {r['tool']} | {r['clients']} | {r['rps']:,.0f} | {r['p50']:.2f} | {r['p99']:.2f} | "
              f"{r['note']} |" for r in rows]
    for c in concurrency:
        by = {(r["server"], r["tool"]): r["rps"] for r in rows if r["clients"] == c}
        grpc_rps, rest_rps = by[("ours", "gRPC (grpc.aio, KServe ModelInfer)")], by[("ours", "REST (aiohttp, binary tensors)")]
        lines.append(f"\n{c} callers: REST / gRPC = {rest_rps / grpc_rps:.2f}")
        if ("ours", "perf_analyzer -i http") in by and ("PyTriton", "perf_analyzer -i http") in by:
            lines.append(f"{c} callers, perf_analyzer -i http: ours / PyTriton = "
                         f"{by[('ours', 'perf_analyzer -i http')] / by[('PyTriton', 'perf_analyzer -i http')]:.2f}")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(f"bench/http_bench.py, model {args.model}, FP32 [1, 1, 28, 28] -> logits, "
                                  f"{args.seconds:g} s per row, {os.cpu_count()} cores (load generators and servers "
                                  "share them)\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
