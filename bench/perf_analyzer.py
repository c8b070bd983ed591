"""Triton's own load tool, perf_analyzer, against `python -m serving serve`, beside the project's client.

    python bench/perf_analyzer.py                          # set up once, then concurrency 1, 8, 64
    python bench/perf_analyzer.py --concurrency 1,8,64,256 --out bench/results/cpu_perf_analyzer.md
    python bench/perf_analyzer.py --protocol grpc,http      # also over REST (Triton's binary tensor extension)

perf_analyzer comes from PyPI (`perf-analyzer`). Its binary needs glibc 2.38 and a newer libstdc++ than
Debian 12 has, so Debian 13's libc6, libstdc++6 and libgcc-s1 are downloaded (`apt-get download` with a
private package list, from the mirror this machine already uses) and unpacked into a private folder; the
binary is started through that folder's dynamic loader. Nothing is installed system-wide.

For each concurrency the server (its own process, the bundled repository unless --model-repository) is measured
by perf_analyzer with its defaults (random FP32 input data, synchronous gRPC calls) and by the project's
benchmark client sending KServe ModelInfer with the same shape, one after the other, on the same server.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving_bench import _kserve_request, drive, start_process, stop_process  # noqa: E402

VERSION = "2.60.0"
WHEEL_PLATFORM = "manylinux_2_38_x86_64"
DEBIAN_SUITE = "trixie"
RUNTIME_PACKAGES = ("libc6", "libstdc++6", "libgcc-s1")
METHOD = "/inference.GRPCInferenceService/ModelInfer"


def _debian_mirror() -> str:
    """The Debian mirror this machine's apt already uses (deb822 or one-line sources)."""
    for path in (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")):
        if path.exists():
            for line in path.read_text().splitlines():
                words = line.split()
                if words[:1] == ["URIs:"] and "security" not in words[1]:
                    return words[1]
                if words[:1] == ["deb"] and "security" not in line:
                    return next(w for w in words[1:] if "://" in w)
    raise SystemExit("no Debian mirror found in /etc/apt: perf_analyzer's runtime libraries cannot be fetched")


def setup(home: Path) -> Path:
    """perf_analyzer's binary and Debian 13's runtime libraries under `home`; returns the binary."""
    binary = home / "perf_analyzer"
    libs = home / "root" / "usr" / "lib" / "x86_64-linux-gnu"
    if binary.exists() and (libs / "ld-linux-x86-64.so.2").exists():
        return binary
    home.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--platform", WHEEL_PLATFORM, "--python-version", "3.11", "--implementation", "cp",
                        f"perf-analyzer=={VERSION}", "-d", tmp], check=True)
        wheel = next(Path(tmp).glob("perf_analyzer-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            binary.write_bytes(z.read("perf_analyzer/bin/perf_analyzer"))
        binary.chmod(0o755)
        apt = Path(tmp) / "apt"
        for d in ("parts", "lists/partial", "cache/archives/partial", "debs"):
            (apt / d).mkdir(parents=True)
        (apt / "parts" / f"{DEBIAN_SUITE}.sources").write_text(
            f"Types: deb\nURIs: {_debian_mirror()}\nSuites: {DEBIAN_SUITE}\nComponents: main\n"
            "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n")
        options = ["-o", "Dir::Etc::SourceList=/dev/null", "-o", f"Dir::Etc::SourceParts={apt / 'parts'}",
                   "-o", f"Dir::State::Lists={apt / 'lists'}", "-o", f"Dir::Cache={apt / 'cache'}",
                   "-o", "Debug::NoLocking=1", "-o", "APT::Sandbox::User=root", "-qq"]
        subprocess.run(["apt-get", *options, "update"], check=True)
        subprocess.run(["apt-get", *options, "download", *RUNTIME_PACKAGES], check=True, cwd=apt / "debs")
        for deb in (apt / "debs").glob("*.deb"):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(home / "root")], check=True)
    return binary


def perf_analyzer_command(home: Path, binary: Path) -> list[str]:
    libs = home / "root" / "usr" / "lib" / "x86_64-linux-gnu"
    return [str(libs / "ld-linux-x86-64.so.2"), "--library-path", f"{libs}:/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu",
            str(binary)]


def run_perf_analyzer(command: list[str], address: str, model: str, concurrency: int, seconds: float,
                      stability: int, protocol: str = "grpc") -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "pa.csv"
        done = subprocess.run([*command, "-m", model, "-i", protocol, "-u", address, "--concurrency-range",
                               f"{concurrency}:{concurrency}", "--measurement-interval", str(int(seconds * 1000)),
                               "--stability-percentage", str(stability), "--max-trials", "20", "-f", str(report)],
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-5:])
            raise SystemExit(f"perf_analyzer -i {protocol} failed at concurrency {concurrency} "
                             f"(exit {done.returncode}):\n{tail}")
        (row,) = list(csv.DictReader(report.open()))
    server_us = {k: float(row[k]) for k in ("Server Queue", "Server Compute Input", "Server Compute Infer",
                                             "Server Compute Output")}
    return {"tool": f"perf_analyzer -i {protocol}", "clients": concurrency, "infer_per_s": float(row["Inferences/Second"]),
            "p50_ms": float(row["p50 latency"]) / 1000, "p99_ms": float(row["p99 latency"]) / 1000,
            "server": "queue {Server Queue:.0f} + input {Server Compute Input:.0f} + infer {Server Compute Infer:.0f} "
                      "+ output {Server Compute Output:.0f} us".format(**server_us)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/perf_analyzer.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--home", default=str(ROOT / ".perf_analyzer"), help="where the tool is kept (git-ignored)")
    p.add_argument("--model-repository", "--repository", dest="repository", default=str(ROOT / "model_repository"),
                   help="the repository to serve (--repository: the older spelling)")
    p.add_argument("--model", default="fashion_mnist")
    p.add_argument("--concurrency", default="1,8,64")
    p.add_argument("--protocol", default="grpc", help="grpc, http (the REST port, binary tensors) or both: grpc,http")
    p.add_argument("--seconds", type=float, default=5.0, help="measurement window of each row")
    p.add_argument("--stability", type=int, default=10, help="perf_analyzer's --stability-percentage (its "
                   "default 10; a busy 2-core machine may need more)")
    p.add_argument("--setup-only", action="store_true")
    p.add_argument("--out", help="also write the table here")
    args = p.parse_args(argv)
    home = Path(args.home)
    command = perf_analyzer_command(home, setup(home))
    if args.setup_only:
        print(" ".join(command))
        return 0
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        http_port = s.getsockname()[1]
    server, address = start_process(["-m", "serving", "serve", "--model-repository", args.repository, "--port", "0",
                                     "--http-port", str(http_port), "--log-level", "WARNING"],
                                    env={**os.environ, "PYTHONPATH": str(ROOT)})
    urls = {"grpc": address, "http": f"127.0.0.1:{http_port}"}
    rows = []
    try:
        from serving.client import ClassifierClient
        with ClassifierClient(address) as client:
            channels, height, width = client.get_model(args.model).input_shape
        if height != width:
            raise SystemExit("the project's client row needs a square input")
        payload = _kserve_request(args.model, channels, height)
        for c in (int(c) for c in args.concurrency.split(",")):
            for protocol in args.protocol.split(","):
                rows.append(run_perf_analyzer(command, urls[protocol], args.model, c, args.seconds, args.stability,
                                              protocol))
            r = asyncio.run(drive(address, METHOD, payload, 1, c, args.seconds, server.pid))
            rows.append({"tool": "project client (KServe ModelInfer)", "clients": c, "infer_per_s": r.requests_per_s,
                         "p50_ms": r.p50_ms, "p99_ms": r.p99_ms, "server": f"{r.errors} errors"})
    finally:
        stop_process(server)
    lines = ["| tool | clients | infer/s | p50 ms | p99 ms | server side (perf_analyzer: from ModelStatistics) |",
             "|---|---:|---:|---:|---:|---|"]
    lines += [f"| {r['tool']} | {r['clients']} | {r['infer_per_s']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
              f"{r['server']} |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(f"perf_analyzer {VERSION}, model {args.model}, {args.seconds:g} s per row\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
