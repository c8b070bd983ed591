"""`python bench/serving_bench.py` (`make bench`): one table, measured in one run on one machine.

For each model: in-process onnxruntime images/s at batch 1..256 (the limit); then the real server (a
separate process) under C concurrent clients sending single-image requests with batching off and on,
many-image requests, and Explain (CAM) against Classify of the same batch. A bare grpc.aio echo server on
the same event loop, driven by the same client with the same request bytes, gives the transport's ceiling.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # a checkout that is not installed (the lent GPU machine) runs it too

from serving.client import to_wire_image  # noqa: E402
from serving.wire.classifier.v1 import classifier_pb2 as pb  # noqa: E402

MODELS = {  # name -> (architecture, channels, size, classes)
    "small": ("small_fmnist", 1, 28, 10),
    "resnet18": ("resnet18", 3, 224, 1000),
    "resnet50": ("resnet50", 3, 224, 1000),
}
ECHO_METHOD = "/bench.Echo/Call"
ECHO_SERVER_FLAG = "--run-echo-server"  # the child process this script starts for the transport's ceiling


@dataclass
class LoadResult:
    requests_per_s: float
    images_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    server_cpu_ms: float | None = None  # CPU time the server process spent per request (all its threads)
    client_cpu_ms: float | None = None  # the same for the load generator (this process)


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds so far of a process and its live descendants (PyTriton's Python process
    runs tritonserver as a child); NaN when the process is gone."""
    try:
        process = psutil.Process(pid)
        family = [process, *process.children(recursive=True)]
    except psutil.Error:
        return float("nan")
    total = 0.0
    for p in family:
        try:
            times = p.cpu_times()
        except psutil.Error:
            continue  # the process ended while we looked
        total += times.user + times.system
    return total


def prepare_repository(models: list[str], work_dir: Path, max_batch_size: int) -> Path:
    """Random-weight exports (speed does not depend on the weights), cached in work_dir."""
    repo = work_dir / "repo"
    for name in models:
        if (repo / name / "1" / "model.onnx").exists():
            continue
        import torch

        from training.export import export_to_repository
        from training.models import create_model
        arch, c, s, k = MODELS[name]
        torch.manual_seed(0)
        model = create_model(arch, in_channels=c, num_classes=k, input_size=(s, s))
        export_to_repository(model, [str(i) for i in range(k)], repo, name, arch, {"note": "random weights"},
                             version=1, max_batch_size=max_batch_size)
    return repo


def bench_in_process(path: Path, shape: tuple[int, ...], batches: list[int], seconds: float, device: str,
                     tensorrt: bool = False) -> dict:
    from serving.engine.runtime import OrtSessions, RuntimeOptions
    # onnxruntime as it comes (spinning threads): the in-process figure is its best, not ours.
    model = OrtSessions(path, "input", ["logits"], 1, RuntimeOptions(device=device, tensorrt=tensorrt, spin_wait=True))
    out = {"provider": model.provider}
    for n in batches:
        x = np.random.rand(n, *shape).astype(np.float32)
        model.run(x, ["logits"])
        times = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end or len(times) < 3:
            t = time.perf_counter()
            model.run(x, ["logits"])
            times.append(time.perf_counter() - t)
        out[n] = {"images_per_s": n * len(times) / sum(times), "p50_ms": 1000 * float(np.median(times))}
    return out


def start_process(args: list[str], timeout_s: float = 180, python: str = sys.executable,
                  env: dict | None = None, cwd: Path = ROOT, stdin=None) -> tuple[subprocess.Popen, str]:
    """Start a process that prints `SERVING host:port` when it serves (the server, the echo server, a bench's
    receiver), from `cwd` (another checkout, to compare with); (process, address). A server gets no fixed REST
    port (CNN_SERVING_HTTP_PORT=0 unless the environment given sets it), so that several can run at once, and is
    one process unless its flags or that environment ask for workers (the served rows measure one server's
    batching against in-process onnxruntime)."""
    env = {"CNN_SERVING_HTTP_PORT": "0", "CNN_SERVING_WORKERS": "1", **(os.environ if env is None else env)}
    proc = subprocess.Popen([python, *args], stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=env, cwd=cwd)
    end = time.time() + timeout_s
    while time.time() < end:
        line = proc.stdout.readline()
        if line.startswith("SERVING"):
            return proc, line.split()[1]
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError(f"{' '.join(args)} did not start")


def stop_process(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()


def run_echo_server() -> None:
    """On the event loop our server would choose, so the ceiling is that of the same transport."""
    from serving.server.app import event_loop_factory
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        runner.run(_echo_server())


async def _echo_server() -> None:
    import grpc

    async def call(request: bytes, context) -> bytes:
        return b"\x1a\x00"  # an empty repeated field: a response of the smallest size

    handler = grpc.method_handlers_generic_handler("bench.Echo", {
        "Call": grpc.unary_unary_rpc_method_handler(call)})
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 256 << 20)])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"SERVING 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


async def drive(address: str, method: str, payload: bytes, images_per_request: int, concurrency: int,
                seconds: float, server_pid: int | None = None, connections: int = 1) -> LoadResult:
    """`concurrency` callers on `connections` channels (each its own TCP connection; callers spread over them in
    turn), each sending `payload` back to back for `seconds`; with server_pid, also the CPU time server and
    client spend per request (the two share this machine)."""
    import grpc
    options = [("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20),
               ("grpc.use_local_subchannel_pool", 1)]  # else gRPC shares one connection among the channels
    channels = [grpc.aio.insecure_channel(address, options=options) for _ in range(max(1, connections))]
    try:
        calls = [ch.unary_unary(method) for ch in channels]
        latencies: list[float] = []
        errors = 0
        for call in calls:
            await call(payload, timeout=60)  # connect and warm
        stop_at = time.perf_counter() + seconds

        async def caller(call) -> None:
            nonlocal errors
            while time.perf_counter() < stop_at:
                t = time.perf_counter()
                try:
                    await call(payload, timeout=60)
                    latencies.append(time.perf_counter() - t)
                except grpc.aio.AioRpcError:
                    errors += 1

        cpu = (process_cpu_s(server_pid) if server_pid else float("nan"), time.process_time())
        started = time.perf_counter()
        await asyncio.gather(*(caller(calls[i % len(calls)]) for i in range(concurrency)))
        elapsed = time.perf_counter() - started
        server_cpu = process_cpu_s(server_pid) - cpu[0] if server_pid else float("nan")
        client_cpu = time.process_time() - cpu[1]
    finally:
        for ch in channels:
            await ch.close()
    lat = np.array(latencies) * 1000 if latencies else np.array([float("nan")])
    n = max(1, len(latencies))
    return LoadResult(len(latencies) / elapsed, len(latencies) * images_per_request / elapsed,
                      float(np.percentile(lat, 50)), float(np.percentile(lat, 99)), errors,
                      None if server_cpu != server_cpu else 1000 * server_cpu / n, 1000 * client_cpu / n)


def _request(model: str, channels: int, size: int, n: int, explain: bool = False) -> bytes:
    rng = np.random.default_rng(0)
    shape = [size, size] if channels == 1 else [size, size, channels]
    images = [to_wire_image(rng.integers(0, 256, shape, np.uint8)) for _ in range(n)]
    msg = pb.ExplainRequest(model=model, images=images) if explain else pb.ClassifyRequest(model=model, images=images)
    return msg.SerializeToString()


def _kserve_request(model: str, channels: int, size: int) -> bytes:
    from serving.wire.inference import grpc_service_pb2 as kpb
    x = np.random.default_rng(0).random((1, channels, size, size), dtype=np.float32)
    return kpb.ModelInferRequest(
        model_name=model, inputs=[kpb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=x.shape)],
        outputs=[kpb.ModelInferRequest.InferRequestedOutputTensor(name="logits")], raw_input_contents=[x.tobytes()],
    ).SerializeToString()


def bench_against_pytriton(args, repo: Path, name: str, concurrency: list[int], max_batch: int, report) -> None:
    """The same ONNX file, the same KServe ModelInfer bytes, the same client: ours against PyTriton's
    dynamic batcher (Triton's own, in its bundled tritonserver)."""
    import socket
    _, ch, size, _ = MODELS[name]
    payload = _kserve_request(name, ch, size)
    method = "/inference.GRPCInferenceService/ModelInfer"
    python = Path(args.pytriton_python)
    env = {**os.environ, "LD_LIBRARY_PATH": f"{python.resolve().parent.parent / 'lib'}:"
           f"{Path(sys.base_prefix) / 'lib'}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = Path(__file__).resolve().parent.parent / "bench" / "pytriton_server.py"
    servers = [("ours", ["-m", "serving", "serve", "--model-repository", str(repo), "--port", "0", "--log-level",
                         "WARNING", "--max-batch-size", str(max_batch)], sys.executable, None),
               ("pytriton", [str(script), str(repo / name), name, str(port), str(max_batch)], str(python), env)]
    for label, cmd, exe, environment in servers:
        proc, addr = start_process(cmd, python=exe, env=environment)
        try:
            for c in concurrency:
                r = asyncio.run(drive(addr, method, payload, 1, c, args.seconds, proc.pid))
                report({"model": name, "mode": f"{label}: KServe ModelInfer single-image", "clients": c, **vars(r)})
        finally:
            stop_process(proc)


def run_bench(args: argparse.Namespace) -> list[dict]:
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    concurrency = [int(c) for c in args.concurrency.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    work_dir = Path(args.work_dir or Path(tempfile.gettempdir()) / "cnn-serving-bench")
    repo = prepare_repository(models, work_dir, max(batches))
    rows: list[dict] = []

    def report(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)

    echo, echo_addr = start_process([str(Path(__file__).resolve()), ECHO_SERVER_FLAG])
    try:
        for c in concurrency:
            r = asyncio.run(drive(echo_addr, ECHO_METHOD, _request("small", 1, 28, 1), 1, c, args.seconds, echo.pid))
            report({"model": "echo (transport ceiling)", "mode": "single-image", "clients": c, **vars(r)})
    finally:
        stop_process(echo)

    for name in models:
        arch, ch, size, _ = MODELS[name]
        inproc = bench_in_process(repo / name / "1" / "model.onnx", (ch, size, size), batches,
                                  args.seconds / 2, args.device, args.tensorrt)
        best = max(batches, key=lambda n: inproc[n]["images_per_s"])
        for n in batches:
            report({"model": name, "mode": f"in-process batch {n}", "clients": 0, "requests_per_s": 0,
                    "images_per_s": inproc[n]["images_per_s"], "p50_ms": inproc[n]["p50_ms"], "p99_ms": 0,
                    "errors": 0, "provider": inproc["provider"], "best_batch": best})
        server_args = ["-m", "serving", "serve", "--model-repository", str(repo), "--port", "0",
                       "--device", args.device, "--log-level", "WARNING"]
        server_args += (["--tensorrt"] if args.tensorrt else []) + args.server_args.split()
        for batching in ("off", "on"):
            extra = ["--max-batch-size", "1"] if batching == "off" else ["--max-batch-size", str(max(batches))]
            proc, addr = start_process(server_args + extra)
            try:
                single = _request(name, ch, size, 1)
                for c in concurrency:
                    r = asyncio.run(drive(addr, "/classifier.v1.Classifier/Classify", single, 1, c, args.seconds,
                                          proc.pid))
                    report({"model": name, "mode": f"single-image, batching {batching}", "clients": c, **vars(r)})
                if batching == "on":
                    many = args.many_images
                    for label, payload, method in (
                            (f"{many}-image Classify", _request(name, ch, size, many), "Classify"),
                            (f"{many}-image Explain (CAM)", _request(name, ch, size, many, True), "Explain")):
                        for c in sorted({1, 4}):
                            r = asyncio.run(drive(addr, f"/classifier.v1.Classifier/{method}", payload, many, c,
                                                  args.seconds, proc.pid))
                            report({"model": name, "mode": label, "clients": c, **vars(r)})
            finally:
                stop_process(proc)
        if args.pytriton_python:
            bench_against_pytriton(args, repo, name, concurrency, max(batches), report)
    if not args.pytriton_python:
        print("PyTriton: not compared (pass --pytriton-python with a Python that has nvidia-pytriton)", file=sys.stderr)
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| model | mode | clients | images/s | requests/s | p50 ms | p99 ms | errors | server CPU ms/req "
             "| client CPU ms/req |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    def rate(v: float) -> str:
        return f"{v:.0f}" if v >= 100 else f"{v:.1f}"

    def cpu(v: float | None) -> str:  # absent in rows of older runs and in-process rows
        return "-" if v is None or v != v else f"{v:.2f}"

    for r in rows:
        lines.append(f"| {r['model']} | {r['mode']} | {r['clients'] or '-'} | {rate(r['images_per_s'])} | "
                     f"{rate(r['requests_per_s'])} | {r['p50_ms']:.2f} | {r['p99_ms'] or 0:.2f} | {r['errors']} | "
                     f"{cpu(r.get('server_cpu_ms'))} | {cpu(r.get('client_cpu_ms'))} |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """The targets of the design, computed from this run's rows."""
    out = []
    echo = {r["clients"]: r for r in rows if r["model"].startswith("echo")}
    for model in sorted({r["model"] for r in rows if not r["model"].startswith("echo")}):
        mine = [r for r in rows if r["model"] == model]
        inproc = [r for r in mine if r["mode"].startswith("in-process")]
        if not inproc:
            continue
        best = max(r["images_per_s"] for r in inproc)
        batch1 = next((r for r in inproc if r["mode"] == "in-process batch 1"), None)
        served = {r["clients"]: r for r in mine if r["mode"] == "single-image, batching on"}
        line = [f"{model}: in-process best {best:.1f} img/s ({inproc[0].get('provider', '')})"]
        c = max((c for c in served if c <= 64), default=0)  # the design's targets are at 64 clients
        if c:
            line.append(f"{c} clients single-image {served[c]['images_per_s']:.1f} img/s = "
                        f"{100 * served[c]['images_per_s'] / best:.0f}% of in-process best")
            if c in echo and served[c]["requests_per_s"] > 0.1 * echo[c]["requests_per_s"]:  # transport-bound
                line.append(f"= {100 * served[c]['requests_per_s'] / echo[c]['requests_per_s']:.0f}% of echo ceiling")
            if served[c].get("server_cpu_ms") and echo.get(c, {}).get("server_cpu_ms"):
                line.append(f"CPU per request at {c} clients: server {served[c]['server_cpu_ms']:.2f} ms "
                            f"(echo server {echo[c]['server_cpu_ms']:.2f}), client {served[c]['client_cpu_ms']:.2f} ms")
        if 1 in served and batch1:
            line.append(f"p50 at 1 client {served[1]['p50_ms']:.2f} ms vs in-process batch-1 {batch1['p50_ms']:.2f} ms")
        many = {r["mode"].split(" ", 1)[1]: r for r in mine if "-image " in r["mode"] and r["clients"] == 4}
        cls = next((v for k, v in many.items() if k.startswith("Classify")), None)
        cam = next((v for k, v in many.items() if k.startswith("Explain")), None)
        if cls:
            line.append(f"many-image requests {cls['images_per_s']:.1f} img/s = {100 * cls['images_per_s'] / best:.0f}% "
                        "of in-process best")
        if cls and cam:
            line.append(f"CAM costs {100 * (cls['images_per_s'] / cam['images_per_s'] - 1):+.1f}% vs Classify")
        out.append("; ".join(line))
    return "\n".join(out)


def render(rows: list[dict]) -> str:
    return format_table(rows) + "\n\n" + summary(rows) + "\n"


def run(args: argparse.Namespace) -> int:
    rows = run_bench(args)
    text = render(rows)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
        Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == [ECHO_SERVER_FLAG]:
        run_echo_server()
        return 0
    p = argparse.ArgumentParser(prog="python bench/serving_bench.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="small,resnet18,resnet50", help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--concurrency", default="1,8,64,256")
    p.add_argument("--batches", default="1,2,4,8,16,32,64,128,256")
    p.add_argument("--many-images", type=int, default=64, help="images per request in the many-image rows")
    p.add_argument("--seconds", type=float, default=4.0, help="duration of each measurement")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--tensorrt", action="store_true", help="TensorRT provider first (GPU)")
    p.add_argument("--pytriton-python", help="a Python with nvidia-pytriton and onnxruntime: adds PyTriton rows")
    p.add_argument("--server-args", default="", help="extra arguments for every served run, e.g. '--ort-spin'")
    p.add_argument("--work-dir", help="where exported models are cached")
    p.add_argument("--out", help="also write the table here (and the rows as .json)")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
