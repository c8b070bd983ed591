"""`python bench/tracing_overhead.py`: what OpenTelemetry tracing costs the server, in one run on one machine.

Servers of the small model run side by side: tracing off, on at 1% (`--trace-config rate=100`), on at 100%
(`--trace`), and optionally the code before tracing existed (`--baseline-checkout`, another checkout of
this project). The traced ones export over OTLP/gRPC to a receiver in a process of its own that counts the
bytes it is sent (a collector's cost is not the server's). Each round drives every server in turn, in a
rotated order, with C concurrent callers of single-image Classify; the table gives each mode's median
throughput over the rounds, its range, and the median of its per-round ratio to tracing off, so a noisy
neighbour slows both sides of a ratio alike.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.serving_bench import _request, drive, prepare_repository, start_process, stop_process  # noqa: E402

RECEIVER_FLAG = "--run-receiver"
EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


def run_receiver() -> None:
    """An OTLP/gRPC trace endpoint that answers every export (an empty ExportTraceServiceResponse is zero
    bytes) and counts what it was sent; prints its port, then its byte count on stdin's end."""
    from concurrent import futures

    import grpc
    received = [0, 0]

    def export(request: bytes, context) -> bytes:
        received[0] += 1
        received[1] += len(request)
        return b""

    server = grpc.server(futures.ThreadPoolExecutor(2))
    handler = grpc.method_handlers_generic_handler(
        "opentelemetry.proto.collector.trace.v1.TraceService",
        {"Export": grpc.unary_unary_rpc_method_handler(export)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"SERVING 127.0.0.1:{port}", flush=True)
    sys.stdin.read()
    print(f"RECEIVED {received[0]} {received[1]}", flush=True)
    server.stop(0)


def per_call_costs(calls: int = 20_000, batch: int = 8) -> list[tuple[str, float]]:
    """What tracing adds per call, measured apart in this process (best of 5): the work done on the event
    loop for one call (its span, its queue span, its share of a batch span) at off, 1% and 100%, and the
    exporter thread's encoding per span. The spans are handed to a processor that keeps nothing."""
    from opentelemetry.sdk.trace import SpanProcessor

    from serving.server.span_encoding import encode
    from serving.server.tracing import TraceConfig, Tracing, call_span, set_call_attributes

    kept = []

    class Keep(SpanProcessor):
        def on_end(self, span) -> None:
            if len(kept) < 4096:
                kept.append(span)

    metadata = (("user-agent", "grpc-python-asyncio/1.85"), ("grpc-accept-encoding", "identity,deflate,gzip"))

    def served(tracing: Tracing) -> float:
        """Microseconds per call of what CallGate, ModelVersion.infer and the batcher ask of tracing."""
        started = time.perf_counter()
        for _ in range(0, calls, batch):
            spans = []
            for _ in range(batch):
                span = tracing.start_call("classifier.v1.Classifier/Classify", metadata) if tracing.on else None
                token = call_span.set(span)
                set_call_attributes("small", 1, 1)
                spans.append(tracing.capture())
                call_span.reset(token)
            if any(spans):
                tracing.batch_ran("small:1", spans, [1] * batch, 2, 3, batch, (1e-5, 1e-4, 1e-5), 0, None)
            for span in spans:
                if span is not None:
                    tracing.end_call(span, "OK")
        return (time.perf_counter() - started) / calls * 1e6

    rows = []
    for label, config in (("off", TraceConfig()), ("1%", TraceConfig(enabled=True, rate=100)),
                          ("100%", TraceConfig(enabled=True))):
        before = os.environ.get("OTEL_TRACES_EXPORTER")
        os.environ["OTEL_TRACES_EXPORTER"] = "none"  # for this Tracing only: the servers below export
        try:
            tracing = Tracing(config)
        finally:
            if before is None:
                del os.environ["OTEL_TRACES_EXPORTER"]
            else:
                os.environ["OTEL_TRACES_EXPORTER"] = before
        if tracing.on:
            tracing.add_span_processor(Keep())
        rows.append((f"event loop, per call, {label}", min(served(tracing) for _ in range(5))))
    spans = kept[:4096]
    encoding = []
    for _ in range(5):
        started = time.perf_counter()
        encode(spans).SerializeToString()
        encoding.append((time.perf_counter() - started) / len(spans) * 1e6)
    rows.append(("exporter thread, per span, encoding", min(encoding)))
    rows.append((f"spans per call at 100% (batches of {batch})", 2 + 1 / batch))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/tracing_overhead.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=5.0, help="duration of each measurement")
    p.add_argument("--baseline-checkout", default="", help="another checkout (e.g. the one before tracing): its "
                   "server is measured too, as 'before'")
    p.add_argument("--unexported", action="store_true", help="also a server tracing at 100%% that exports nothing "
                   "(OTEL_TRACES_EXPORTER=none)")
    p.add_argument("--work-dir", help="where the exported model is cached")
    p.add_argument(RECEIVER_FLAG, action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.run_receiver:
        run_receiver()
        return 0

    costs = per_call_costs()
    repo = prepare_repository(["small"], Path(args.work_dir or Path(tempfile.gettempdir()) / "cnn-serving-bench"), 256)
    receiver, receiver_addr = start_process([str(Path(__file__).resolve()), RECEIVER_FLAG], env=dict(os.environ),
                                               stdin=subprocess.PIPE)
    serve = ["-m", "serving", "serve", "--model-repository", str(repo), "--port", "0", "--device", "cpu",
             "--log-level", "WARNING", "--max-batch-size", "256"]
    env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{receiver_addr}", "OTEL_SERVICE_NAME": "bench"}
    # mode -> (checkout, command, extra environment)
    modes = {"off": (ROOT, serve, {}), "1%": (ROOT, serve + ["--trace", "--trace-config", "rate=100"], {}),
             "100%": (ROOT, serve + ["--trace"], {})}
    if args.unexported:  # spans made but not exported: what making them costs, apart from encoding and sending
        modes["100%, not exported"] = (ROOT, serve + ["--trace"], {"OTEL_TRACES_EXPORTER": "none"})
    if args.baseline_checkout:
        modes = {"before": (Path(args.baseline_checkout), serve, {}), **modes}
    servers = {}
    try:
        for mode, (cwd, command, extra) in modes.items():
            servers[mode] = start_process(command, env={**env, "PYTHONPATH": str(cwd), **extra}, cwd=cwd)
        payload = _request("small", 1, 28, 1)
        results: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
        order = list(modes)
        for mode in order:  # warm every server (sessions, connections, the exporter's channel)
            asyncio.run(drive(servers[mode][1], "/classifier.v1.Classifier/Classify", payload, 1, args.clients, 1.0))
        for r in range(args.rounds):
            rotated = order[r % len(order):] + order[:r % len(order)]
            for mode in rotated:
                proc, addr = servers[mode]
                res = asyncio.run(drive(addr, "/classifier.v1.Classifier/Classify", payload, 1, args.clients,
                                        args.seconds, proc.pid))
                results[mode].append((res.requests_per_s, res.server_cpu_ms or float("nan")))
                print(f"round {r + 1} {mode:>18}: {res.requests_per_s:8.0f} req/s, server "
                      f"{res.server_cpu_ms:.3f} ms CPU/request, errors {res.errors}", file=sys.stderr, flush=True)
    finally:
        for proc, _ in servers.values():
            stop_process(proc)
        out, _ = receiver.communicate("", timeout=30)
    received = next((line.split()[1:] for line in out.splitlines() if line.startswith("RECEIVED")), ["?", "?"])

    print(f"\nsmall model, {args.clients} callers, single-image Classify, {args.rounds} rounds of {args.seconds:g} s "
          f"(interleaved), {os.cpu_count()} CPUs")
    print("| mode | median req/s | range req/s | median ratio to off | server CPU ms/request (median) |")
    print("|---|---:|---:|---:|---:|")
    off = [rps for rps, _ in results["off"]]
    for mode, rows in results.items():
        rps = [x for x, _ in rows]
        ratios = [x / o for x, o in zip(rps, off)]
        print(f"| {mode} | {statistics.median(rps):,.0f} | {min(rps):,.0f}-{max(rps):,.0f} | "
              f"{statistics.median(ratios):.3f} | {statistics.median(c for _, c in rows):.3f} |")
    print(f"\nOTLP receiver: {received[0]} exports, {received[1]} bytes")
    if "100%" in results and received[0] in ("0", "?"):
        print("warning: the receiver got nothing: the traced servers did not export", file=sys.stderr)
    print("\n| what tracing adds, measured apart | µs |\n|---|---:|")
    for label, value in costs:
        print(f"| {label} | {value:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
