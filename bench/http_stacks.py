"""Which HTTP stack for the REST port: aiohttp on the server's loop against an ASGI app (Starlette) under
uvicorn served on the same kind of loop, each doing what the REST port does around a call and nothing of the
model: read the body (Triton's binary layout: JSON header, then the tensor), parse the header with orjson,
answer a small JSON header and a binary output.

    python bench/http_stacks.py [--seconds 6] [--concurrency 1,64] [--out bench/results/cpu_http_stacks.md]

Each stack runs in its own process on uvloop (`SERVING host:port` when ready); the load generator is
bench/http_bench.drive_http (aiohttp, one keep-alive connection per caller) in this process.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from http_bench import drive_http, rest_request  # noqa: E402
from serving_bench import start_process, stop_process  # noqa: E402

SERVE_FLAG = "--serve"
OUTPUT = b"\0" * 40  # ten FP32 logits
STACKS = ("aiohttp", "starlette")


def answer(body: bytes, header_length: str | None) -> tuple[bytes, str]:
    n = int(header_length) if header_length else len(body)
    request = orjson.loads(body[:n])
    head = orjson.dumps({"model_name": "m", "model_version": "1", "outputs": [
        {"name": request["outputs"][0]["name"], "datatype": "FP32", "shape": [1, 10],
         "parameters": {"binary_data_size": len(OUTPUT)}}]})
    return head + OUTPUT, str(len(head))


async def serve_aiohttp(port: int) -> None:
    from aiohttp import web

    async def infer(request: web.Request) -> web.Response:
        out, n = answer(await request.read(), request.headers.get("Inference-Header-Content-Length"))
        return web.Response(body=out, content_type="application/octet-stream",
                            headers={"Inference-Header-Content-Length": n})

    app = web.Application()
    app.router.add_post("/v2/models/{model}/infer", infer)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print(f"SERVING 127.0.0.1:{port}", flush=True)
    await asyncio.Event().wait()


async def serve_starlette(port: int) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def infer(request: Request) -> Response:
        out, n = answer(await request.body(), request.headers.get("inference-header-content-length"))
        return Response(out, media_type="application/octet-stream", headers={"Inference-Header-Content-Length": n})

    app = Starlette(routes=[Route("/v2/models/{model}/infer", infer, methods=["POST"])])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False,
                                           loop="none", http="httptools", lifespan="off"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    print(f"SERVING 127.0.0.1:{port}", flush=True)
    await task


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [SERVE_FLAG]:
        import uvloop
        stack, port = argv[1], int(argv[2])
        uvloop.run(serve_aiohttp(port) if stack == "aiohttp" else serve_starlette(port))
        return 0
    p = argparse.ArgumentParser(prog="python bench/http_stacks.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--concurrency", default="1,64")
    p.add_argument("--out")
    args = p.parse_args(argv)
    body, headers = rest_request(1, 28)
    rows = []
    for stack in STACKS:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc, address = start_process([str(Path(__file__).resolve()), SERVE_FLAG, stack, str(port)])
        try:
            for c in (int(c) for c in args.concurrency.split(",")):
                r = asyncio.run(drive_http(f"http://{address}/v2/models/m/infer", body, headers, c, args.seconds, proc.pid))
                rows.append(f"| {stack} | {c} | {r.requests_per_s:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | "
                            f"{r.server_cpu_ms:.3f} | {r.errors} |")
        finally:
            stop_process(proc)
    text = "\n".join(["| stack | callers | req/s | p50 ms | p99 ms | server CPU ms/req | errors |",
                      "|---|---:|---:|---:|---:|---:|---:|", *rows]) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(f"bench/http_stacks.py, {args.seconds:g} s per row, {os.cpu_count()} cores shared "
                                  "with other work; the REST port's work around a call, no model\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
