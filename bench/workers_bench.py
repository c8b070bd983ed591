"""`serve --workers N` in one run: workers 1, 2 and auto against the transport's echo ceiling and against PyTriton.

    python bench/workers_bench.py                                   # perf_analyzer set up on first use
    python bench/workers_bench.py --pytriton-python .pytriton-venv/bin/python --out bench/results/cpu_workers.md

For each worker count (auto counted once where it is a count already measured), one server process tree
(`python -m serving serve --workers N`, the bundled repository, every other flag at its default):
- the project's own client: single-image `Classify` from 64 asyncio callers spread over 8 connections (one
  connection stays on one worker), with the CPU time the server's whole process tree and the client spend per
  request;
- Triton's perf_analyzer (bench/perf_analyzer.py sets it up): concurrency 1, 8 and 64, KServe ModelInfer with
  random FP32 input, its defaults otherwise (it checks the server's ModelStatistics against its own counts).
Before them, the bare `grpc.aio` echo server (one process, the event loop ours would choose) under the same
client gives the ceiling of the transport; with --pytriton-python, PyTriton serves the same ONNX file
(bench/pytriton_server.py: Triton's C++ front end and dynamic batcher, onnxruntime behind it) to the same
perf_analyzer runs, twice: with the logits alone, and with the same four outputs as ours (PEERS below); and
ours serves a copy of the model that lists the logits alone (`--workers auto`), like for like with the first.
Client, servers and models share this machine's cores.

Every server is up for the whole run, and each round measures each one in turn at each load (three rounds,
the median reported with every round's figure): a neighbour's load on a shared machine then falls on all of
them alike, where one server after the other would each meet a different machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import socket
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

from perf_analyzer import perf_analyzer_command, run_perf_analyzer, setup  # noqa: E402
from serving_bench import (  # noqa: E402
    ECHO_METHOD,
    ECHO_SERVER_FLAG,
    _request,
    drive,
    process_cpu_s,
    start_process,
    stop_process,
)

from serving.repository_format import CAM_WEIGHTS_FILE, load_spec, read_config, write_config  # noqa: E402
from serving.server.supervisor import resolve_workers, usable_cores  # noqa: E402

MODEL = "fashion_mnist"
# The peers PyTriton serves (bench/pytriton_server.py): perf_analyzer asks a server for every output its model
# lists. Ours lists four for this model (logits, features, probabilities and the CAM, 15.7 KB per answer); the
# first peer lists logits alone (40 bytes), the second the same four, computed by the same formula.
PEERS = {"PyTriton, logits only": (), "PyTriton + CAM, the same 4 outputs": ("--same-outputs",)}
LEAN = "logits and probabilities only"  # our row like for like with the first peer (_logits_only_copy)
CLASSIFY = "/classifier.v1.Classifier/Classify"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _project_row(label: str, address: str, pid: int, args) -> dict:
    ours = label.startswith("workers")
    before = _counts(address) if ours else (0, 0)
    r = asyncio.run(drive(address, CLASSIFY if ours else ECHO_METHOD, _request(MODEL, 1, 28, 1), 1, args.clients,
                          args.seconds, pid, args.connections))
    cpu = f"server {r.server_cpu_ms:.2f}, client {r.client_cpu_ms:.2f}"
    if ours:
        after = _counts(address)
        cpu += f"; {(after[0] - before[0]) / max(1, after[1] - before[1]):.1f} per batch"
    return {"server": label, "tool": f"project client, {args.clients} callers / {args.connections} connections",
            "clients": args.clients, "infer_per_s": r.requests_per_s, "p50_ms": r.p50_ms, "p99_ms": r.p99_ms,
            "cpu": cpu, "errors": r.errors}


def _counts(address: str) -> tuple[int, int]:
    """Requests the server counts as answered, and the batches it ran (ModelStatistics: every worker's, or
    Triton's own)."""
    import grpc

    from serving.wire.inference import grpc_service_pb2 as kpb
    from serving.wire.inference import grpc_service_pb2_grpc as kgrpc
    with grpc.insecure_channel(address) as channel:
        stats = kgrpc.GRPCInferenceServiceStub(channel).ModelStatistics(kpb.ModelStatisticsRequest(name=MODEL),
                                                                         timeout=30)
    return (sum(s.inference_stats.success.count for s in stats.model_stats),
            sum(s.execution_count for s in stats.model_stats))


def _perf_row(label: str, address: str, pid: int, command: list[str], c: int, args) -> dict:
    """perf_analyzer at concurrency c, and the CPU time the server's process tree and perf_analyzer spent per
    request over its whole run (its trial windows included): the server's answered count from ModelStatistics."""
    before, cpu, tool_cpu = _counts(address), process_cpu_s(pid), _children_cpu_s()
    try:
        row = run_perf_analyzer(command, address, MODEL, c, args.seconds, args.stability)
    except SystemExit as e:  # no stable measurement on a busy machine: the row says so, the run goes on
        print(e, file=sys.stderr)
        row = {"infer_per_s": float("nan"), "p50_ms": float("nan"), "p99_ms": float("nan")}
    after = _counts(address)
    n = max(1, after[0] - before[0])
    per_request = (f"server {1000 * (process_cpu_s(pid) - cpu) / n:.2f}, "
                   f"perf_analyzer {1000 * (_children_cpu_s() - tool_cpu) / n:.2f}; "
                   f"{n / max(1, after[1] - before[1]):.1f} per batch")
    return {"server": label, "tool": "perf_analyzer", "clients": c, "infer_per_s": row["infer_per_s"],
            "p50_ms": row["p50_ms"], "p99_ms": row["p99_ms"], "cpu": per_request, "errors": 0}


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # the ended perf_analyzer runs
    return usage.ru_utime + usage.ru_stime


def _median_rows(rows: list[dict]) -> list[dict]:
    """One row per (server, tool, clients): the round of median throughput, with every round's figure."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["server"], r["tool"], r["clients"]), []).append(r)
    out = []
    for group in groups.values():
        ranked = sorted(group, key=lambda r: (r["infer_per_s"] == r["infer_per_s"], r["infer_per_s"]))  # failed: lowest
        row = dict(ranked[(len(ranked) - 1) // 2])
        row["rounds"] = " / ".join(f"{r['infer_per_s']:.0f}" for r in group)
        out.append(row)
    return out


def run(args) -> list[dict]:
    """Every server is started first and stays up (idle ones cost next to nothing); then each round measures
    each of them in turn at each load, so that a neighbour's load on this shared machine falls on all alike."""
    home = Path(args.home)
    # No perf_analyzer rows (`--concurrency ""`): nothing to set up (a machine without a network can run the rest).
    command = perf_analyzer_command(home, setup(home)) if args.concurrency else None
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rows: list[dict] = []

    def report(row: dict) -> None:
        print(f"{row['server']} | {row['tool']} | c={row['clients']} | {row['infer_per_s']:.0f}/s", file=sys.stderr,
              flush=True)
        rows.append(row)

    labels: dict[int, str] = {}
    for w in args.workers:
        n = resolve_workers(w)
        labels.setdefault(n, f"workers {n}")
        if w == "auto":
            labels[n] += " (auto)"
    servers = []  # (label, process, address, ours)
    scratch = tempfile.TemporaryDirectory()
    try:
        proc, address = start_process([str(ROOT / "bench" / "serving_bench.py"), ECHO_SERVER_FLAG], env=env)
        servers.append(("echo (1 process, transport ceiling)", proc, address, False))
        for n, label in labels.items():
            proc, address = start_process(["-m", "serving", "serve", "--model-repository", args.model_repository,
                                           "--port", "0", "--http-port", "0", "--log-level", "WARNING", "--workers",
                                           str(n)], env=env)
            servers.append((label, proc, address, True))
        if args.pytriton_python:
            # Like for like with the logits-only peer: the same model without its features output (and so
            # without CAM), whose answers then hold logits and probabilities, 80 bytes.
            lean = _logits_only_copy(Path(args.model_repository) / MODEL, Path(scratch.name) / MODEL)
            n = resolve_workers("auto")
            proc, address = start_process(["-m", "serving", "serve", "--model-repository", str(lean.parent),
                                           "--port", "0", "--http-port", "0", "--log-level", "WARNING", "--workers",
                                           str(n)], env=env)
            servers.append((f"workers {n}, {LEAN}", proc, address, True))
            python = Path(args.pytriton_python)
            pt_env = {**os.environ, "LD_LIBRARY_PATH": f"{python.resolve().parent.parent / 'lib'}:"
                      f"{Path(sys.base_prefix) / 'lib'}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
            for label, flags in PEERS.items():
                proc, address = start_process([str(ROOT / "bench" / "pytriton_server.py"),
                                               str(Path(args.model_repository) / MODEL), MODEL, str(_free_port()), "64",
                                               *flags], python=str(python), env=pt_env)
                servers.append((label, proc, address, False))
        for _ in range(args.rounds):
            for label, proc, address, ours in servers:
                if ours or label.startswith("echo"):
                    report(_project_row(label, address, proc.pid, args))
            for c in args.concurrency:
                for label, proc, address, _ in servers:
                    if not label.startswith("echo"):
                        report(_perf_row(label, address, proc.pid, command, c, args))
    finally:
        for _, proc, _, _ in servers:
            stop_process(proc)
        scratch.cleanup()
    return _median_rows(rows)


def _logits_only_copy(model_dir: Path, into: Path) -> Path:
    """A copy of the model whose config lists the logits alone: no features output, no CAM weights."""
    shutil.copytree(model_dir, into, ignore=shutil.ignore_patterns(CAM_WEIGHTS_FILE))
    config = read_config(into)
    kept = [o for o in config.output if o.name == load_spec(model_dir).logits_output]
    del config.output[:]
    config.output.extend(kept)
    del config.parameters["features_output"]
    write_config(into, config)
    return into


def render(rows: list[dict], args) -> str:
    lines = [f"{usable_cores()} usable cores; the bundled model ({MODEL}); {args.seconds:g} s windows; "
             f"{args.rounds} rounds, the median shown (every round's figure in the last column)", "",
             "| server | tool | clients | infer/s | p50 ms | p99 ms | CPU ms per request; requests per batch | errors "
             "| rounds |",
             "|---|---|---:|---:|---:|---:|---|---:|---|"]
    lines += [f"| {r['server']} | {r['tool']} | {r['clients']} | {r['infer_per_s']:.0f} | {r['p50_ms']:.2f} | "
              f"{r['p99_ms']:.2f} | {r['cpu']} | {r['errors']} | {r['rounds']} |" for r in rows]
    ours = sorted({r["server"] for r in rows if r["server"].startswith("workers")})
    for label in PEERS:
        peer = {r["clients"]: r["infer_per_s"] for r in rows if r["server"] == label}
        if not peer:
            continue
        lines += ["", f"perf_analyzer, ours / {label}:", "", "| clients | " + " | ".join(ours) + " |",
                  "|---:|" + "---:|" * len(ours)]
        for c in sorted(peer):
            cells = [next((f"{r['infer_per_s'] / peer[c]:.2f}x" for r in rows if r["server"] == s
                           and r["tool"] == "perf_analyzer" and r["clients"] == c), "-") for s in ours]
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
    echo = next((r for r in rows if r["server"].startswith("echo")), None)
    if echo:
        lines += ["", f"project client against the echo ceiling ({echo['infer_per_s']:.0f}/s):", ""]
        for r in rows:
            if r["server"].startswith("workers") and r["tool"].startswith("project"):
                lines.append(f"- {r['server']}: {r['infer_per_s']:.0f}/s = {r['infer_per_s'] / echo['infer_per_s']:.2f}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/workers_bench.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", default="1,2,auto", help="worker counts to measure")
    p.add_argument("--concurrency", default="1,8,64", help="perf_analyzer's concurrencies")
    p.add_argument("--clients", type=int, default=64, help="the project client's callers")
    p.add_argument("--connections", type=int, default=8, help="the project client's connections")
    p.add_argument("--seconds", type=float, default=3.0, help="measurement window of each row")
    p.add_argument("--stability", type=int, default=25, help="perf_analyzer's --stability-percentage (its default "
                   "10 rarely settles on a busy 2-core machine)")
    p.add_argument("--rounds", type=int, default=3, help="each figure is the median of this many rounds")
    p.add_argument("--model-repository", default=str(ROOT / "model_repository"))
    p.add_argument("--home", default=str(ROOT / ".perf_analyzer"), help="where perf_analyzer is kept (git-ignored)")
    p.add_argument("--pytriton-python", help="a Python with nvidia-pytriton and onnxruntime: adds PyTriton's rows")
    p.add_argument("--out", help="also write the tables here")
    args = p.parse_args(argv)
    args.workers = [w.strip() for w in args.workers.split(",") if w.strip()]
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    text = render(run(args), args)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
