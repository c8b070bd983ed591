#!/usr/bin/env python3
"""Soak the server: valid, invalid, cancelled and streaming calls on both APIs for a while, then SIGTERM.

    python scripts/soak.py --seconds 60 --workers 16

It starts `python -m serving serve` on 127.0.0.1 (loopback only) with a bearer token, sends a seeded mix of
calls from one asyncio client for --seconds (at most --max-calls), sends SIGTERM, and keeps calling as a
client would until the server refuses (UNAVAILABLE) or is gone. It then prints what was sent, answered,
rejected (by class) and lost, the latency of the valid calls, and the server's RSS, and exits non-zero when a
call was lost or wrongly answered or the server did not exit 0.

A call is *lost* when the server accepted it and gave no answer: CANCELLED that the client did not ask for,
gRPC's "Cancelling all calls" at close, a broken connection, a valid call past its (generous) deadline. A
call is *wrong* when it was answered with a status its class does not allow (INTERNAL for a bad image).
UNAVAILABLE from the draining server ("shutting down"), a connection the server closed at the end of its drain
("Socket closed": by then it holds no accepted call) or a refused connection after exit is a rejection: the
client sends such a call to another replica.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import secrets
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serving.wire.classifier.v1 import classifier_pb2 as cpb  # noqa: E402
from serving.wire.classifier.v1 import classifier_pb2_grpc as cpb_grpc  # noqa: E402
from serving.wire.inference import grpc_service_pb2 as kpb  # noqa: E402
from serving.wire.inference import grpc_service_pb2_grpc as kpb_grpc  # noqa: E402

CALL_DEADLINE_S = 30.0  # a valid call that takes longer than this is counted lost
OK, SHUT = grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE
# What each class of call may be answered with (a refusal while shutting down is always allowed).
EXPECTED = {
    "valid": {OK, grpc.StatusCode.RESOURCE_EXHAUSTED},          # a full queue is an answer too
    "invalid": {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED},
    "cancelled": {OK, grpc.StatusCode.CANCELLED},               # cancelled by us, or answered before that
}


@dataclass
class Tally:
    sent: Counter = field(default_factory=Counter)             # by kind
    answers: Counter = field(default_factory=Counter)          # by (class, code)
    rejected_shutdown: int = 0
    refused_connection: int = 0
    lost: list = field(default_factory=list)
    wrong: list = field(default_factory=list)
    latencies: list = field(default_factory=list)              # seconds, valid calls answered OK
    stream_items_sent: int = 0
    stream_items_answered: int = 0
    stream_items_not_read: int = 0                              # after the server stopped reading: resent elsewhere
    stream_items_abandoned: int = 0                             # unanswered when the client left its stream

    def record(self, kind: str, klass: str, code: grpc.StatusCode, details: str, latency: float) -> None:
        if code == SHUT and "shutting down" in details:
            self.rejected_shutdown += 1
        elif code == SHUT and _closed_or_refused(details):
            self.refused_connection += 1  # the port or the connection was closed: nothing of it was run
        elif code in EXPECTED[klass]:
            self.answers[(klass, code.name)] += 1
            if klass == "valid" and code == OK:
                self.latencies.append(latency)
        elif code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN,
                      grpc.StatusCode.DEADLINE_EXCEEDED):
            self.lost.append((kind, code.name, details, f"at {time.strftime('%H:%M:%S')}"))
        else:
            self.wrong.append((kind, code.name, details))


def _closed_or_refused(details: str) -> bool:
    return "connect" in details.lower() or "socket closed" in details.lower()


class Soak:
    def __init__(self, address: str, token: str, seed: int):
        self.token = token
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.channel = grpc.aio.insecure_channel(address)
        self.classifier = cpb_grpc.ClassifierStub(self.channel)
        self.kserve = kpb_grpc.GRPCInferenceServiceStub(self.channel)
        self.rng = random.Random(seed)
        self.tally = Tally()
        pixels = np.random.default_rng(seed).integers(0, 256, (4, 28, 28), np.uint8)
        self.images = [cpb.Image(tensor=cpb.Tensor(shape=[28, 28], dtype="uint8", data=p.tobytes())) for p in pixels]

    # -- the calls ---------------------------------------------------------------------------------------------
    def classify_request(self, n: int = 1, bad: bool = False) -> cpb.ClassifyRequest:
        images = [cpb.Image(encoded=b"not an image")] if bad else self.images[:n]
        return cpb.ClassifyRequest(images=images, top_k=3)

    @staticmethod
    def infer_request(n: int = 1, bad: bool = False, model: str = "") -> kpb.ModelInferRequest:
        shape = [n, 1, 27, 28] if bad else [n, 1, 28, 28]
        return kpb.ModelInferRequest(model_name=model, inputs=[kpb.ModelInferRequest.InferInputTensor(
            name="input", datatype="UINT8", shape=shape)], raw_input_contents=[bytes(int(np.prod(shape)))])

    def unary(self, model: str):
        """(kind, class, the call's coroutine factory, cancel after seconds or None)."""
        r = self.rng.random()
        md = self.metadata
        if r < 0.30:
            n = self.rng.choice([1, 1, 2, 4])
            return "classify", "valid", lambda: self.classifier.Classify(self.classify_request(n), metadata=md,
                                                                           timeout=CALL_DEADLINE_S), None
        if r < 0.58:
            n = self.rng.choice([1, 1, 2, 4])
            return "infer", "valid", lambda: self.kserve.ModelInfer(self.infer_request(n, model=model), metadata=md,
                                                                    timeout=CALL_DEADLINE_S), None
        if r < 0.63:
            return "explain", "valid", lambda: self.classifier.Explain(
                cpb.ExplainRequest(images=self.images[:1]), metadata=md, timeout=CALL_DEADLINE_S), None
        if r < 0.70:
            return "classify-bad-image", "invalid", lambda: self.classifier.Classify(
                self.classify_request(bad=True), metadata=md, timeout=CALL_DEADLINE_S), None
        if r < 0.77:
            return "infer-bad-shape", "invalid", lambda: self.kserve.ModelInfer(
                self.infer_request(bad=True, model=model), metadata=md, timeout=CALL_DEADLINE_S), None
        if r < 0.81:
            return "infer-unknown-model", "invalid", lambda: self.kserve.ModelInfer(
                self.infer_request(model="no-such-model"), metadata=md, timeout=CALL_DEADLINE_S), None
        if r < 0.85:
            return "classify-no-token", "invalid", lambda: self.classifier.Classify(
                self.classify_request(), timeout=CALL_DEADLINE_S), None
        cancel_after = self.rng.uniform(0, 0.004)
        if r < 0.93:
            return "classify-cancelled", "cancelled", lambda: self.classifier.Classify(
                self.classify_request(4), metadata=md, timeout=CALL_DEADLINE_S), cancel_after
        return "infer-cancelled", "cancelled", lambda: self.kserve.ModelInfer(
            self.infer_request(4, model=model), metadata=md, timeout=CALL_DEADLINE_S), cancel_after

    async def unary_worker(self, model: str, budget: list[int]) -> None:
        """Calls one after the other until the server refuses one (then a client moves to another replica)."""
        while budget[0] > 0:
            budget[0] -= 1
            kind, klass, make, cancel_after = self.unary(model)
            self.tally.sent[kind] += 1
            started = time.monotonic()
            call = make()
            if cancel_after is not None:
                asyncio.get_running_loop().call_later(cancel_after, call.cancel)
            try:
                await call
                code, details = OK, ""
            except asyncio.CancelledError:
                code, details = grpc.StatusCode.CANCELLED, "cancelled by the client"
            except grpc.aio.AioRpcError as e:
                code, details = e.code(), e.details() or ""
            self.tally.record(kind, klass, code, details, time.monotonic() - started)
            if code == SHUT:
                return

    @staticmethod
    async def write_stream(call, make, items: int, window: asyncio.Semaphore, budget: list[int], sent: list[int]):
        """Send up to `items` requests on a stream, at most the window's worth unanswered, then half-close."""
        for i in range(items):
            await window.acquire()
            if budget[0] <= 0:
                break
            budget[0] -= 1
            await call.write(make(i))
            sent[0] += 1
        await call.done_writing()

    async def stream_worker(self, api: str, model: str, budget: list[int]) -> None:
        """Streams of up to 200 items, at most 8 unanswered; one stream in five is abandoned midway by the client
        (its queued work must be freed); the server may end one with UNAVAILABLE when it shuts down."""
        while budget[0] > 0:
            items = self.rng.randint(20, 200)
            abandon_at = self.rng.randint(1, items - 1) if self.rng.random() < 0.2 else None
            self.tally.sent[f"{api}-stream"] += 1
            if api == "classifier":
                call = self.classifier.ClassifyStream(metadata=self.metadata)
                make = lambda i: cpb.StreamClassifyRequest(request_id=str(i), request=self.classify_request(1))
            else:
                call = self.kserve.ModelStreamInfer(metadata=self.metadata)
                make = lambda i: self.infer_request(1, model=model)
            window, sent, answered = asyncio.Semaphore(8), [0], 0
            writer = asyncio.create_task(self.write_stream(call, make, items, window, budget, sent))
            code, details = OK, ""
            try:
                async for response in call:
                    error = response.error_code if api == "classifier" else response.error_message
                    if error:
                        self.tally.wrong.append((f"{api}-stream-item", str(error), ""))
                    answered += 1
                    window.release()
                    if abandon_at is not None and answered >= abandon_at:
                        call.cancel()
                        break
            except grpc.aio.AioRpcError as e:
                code, details = e.code(), e.details() or ""
            except asyncio.CancelledError:
                pass
            writer.cancel()
            sent = sent[0]
            self.tally.stream_items_sent += sent
            self.tally.stream_items_answered += answered
            if abandon_at is not None and answered >= abandon_at:
                self.tally.answers[("cancelled", "CANCELLED")] += 1
                self.tally.stream_items_abandoned += sent - answered
                continue
            if code == SHUT and "shutting down" in details:
                self.tally.stream_items_not_read += sent - answered
                self.tally.rejected_shutdown += 1
                return
            if code == SHUT and _closed_or_refused(details):
                self.tally.refused_connection += 1
                return
            if code != OK:
                self.tally.lost.append((f"{api}-stream", code.name, f"{sent - answered} item(s) unanswered: {details}",
                                        f"at {time.strftime('%H:%M:%S')}, {answered} answered of {items}"))
            else:
                self.tally.answers[("valid", "OK")] += 1


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def start_server(args, token: str) -> tuple[subprocess.Popen, str, list[str]]:
    env = dict(os.environ, CNN_SERVING_AUTH_TOKENS=token, CNN_SERVING_HTTP_PORT="0")
    cmd = [sys.executable, "-m", "serving", "serve", "--host", "127.0.0.1", "--port", "0",
           "--drain-delay", str(args.drain_delay), "--exit-timeout", str(args.exit_timeout), "--log-level", "WARNING"]
    if args.model_repository:
        cmd += ["--model-repository", args.model_repository]
    proc = subprocess.Popen(cmd + args.server_args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("SERVING"):
            return proc, line.split()[1], lines
    raise SystemExit("the server did not start:\n" + "".join(lines))


async def soak(args) -> int:
    token = secrets.token_urlsafe(24)
    proc, address, lines = start_server(args, token)

    async def drain_output():
        loop = asyncio.get_running_loop()
        while (line := await loop.run_in_executor(None, proc.stdout.readline)):
            lines.append(line)

    output = asyncio.create_task(drain_output())
    soak = Soak(address, token, args.seed)
    model = args.model
    rss_ready = rss_mb(proc.pid)[0]
    budget = [args.max_calls]
    started = time.monotonic()
    workers = [asyncio.create_task(soak.unary_worker(model, budget)) for _ in range(args.workers)]
    workers += [asyncio.create_task(soak.stream_worker(api, model, budget)) for api in ("classifier", "kserve")]
    await asyncio.sleep(min(5.0, args.seconds / 4))
    rss_warm = rss_mb(proc.pid)[0]
    deadline = started + args.seconds
    while time.monotonic() < deadline and budget[0] > 0:
        await asyncio.sleep(0.1)
    rss_end, rss_peak = rss_mb(proc.pid)
    traffic_s = time.monotonic() - started
    proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    print(f"SIGTERM at {time.strftime('%H:%M:%S')}", flush=True)
    returncode = await asyncio.get_running_loop().run_in_executor(None, proc.wait, args.exit_timeout + 30)
    exit_s = time.monotonic() - signalled
    done, pending = await asyncio.wait(workers, timeout=30)
    for task in pending:
        task.cancel()
    for task in done:
        if task.exception():
            raise task.exception()
    await soak.channel.close()
    await output

    t = soak.tally
    sent = sum(t.sent.values())
    answered = sum(t.answers.values())
    lat = np.array(t.latencies) * 1000 if t.latencies else np.zeros(1)
    by_class = Counter()
    for (klass, code), n in t.answers.items():
        by_class[f"{klass}:{code}"] += n
    print(f"soak: {traffic_s:.0f} s of traffic against {address} ({args.workers} unary workers, 2 stream workers), "
          "then SIGTERM")
    print(f"  sent       {sent} calls ({', '.join(f'{k} {v}' for k, v in sorted(t.sent.items()))})")
    print(f"             + {t.stream_items_sent} stream items ({t.stream_items_answered} answered, "
          f"{t.stream_items_abandoned} left unanswered by clients that cancelled their stream, "
          f"{t.stream_items_not_read} not read when the server stopped reading)")
    print(f"  answered   {answered} ({', '.join(f'{k} {v}' for k, v in sorted(by_class.items()))})")
    print(f"  rejected   {t.rejected_shutdown} by the draining server (UNAVAILABLE), {t.refused_connection} on "
          "connections closed at the end of the drain or refused after exit; invalid calls answered with their error "
          "are counted above")
    print(f"  lost       {len(t.lost)}" + (f": {t.lost[:5]}" if t.lost else ""))
    print(f"  wrong      {len(t.wrong)}" + (f": {t.wrong[:5]}" if t.wrong else ""))
    print(f"  latency    valid calls answered OK: p50 {np.percentile(lat, 50):.2f} ms, p99 {np.percentile(lat, 99):.2f} ms "
          f"({len(t.latencies)} calls)")
    print(f"  server RSS {rss_ready:.0f} MB ready, {rss_warm:.0f} MB after warm-up, {rss_end:.0f} MB at the end "
          f"({rss_end - rss_warm:+.1f} MB since warm-up; peak {rss_peak:.0f} MB)")
    print(f"  exit       code {returncode}, {exit_s:.2f} s after SIGTERM")
    errors = [line for line in lines if re.search(r"ERROR|Traceback", line)]
    if errors:
        print("  server log errors:\n    " + "    ".join(errors[:20]))
    return 0 if not t.lost and not t.wrong and returncode == 0 else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=60.0, help="traffic before the SIGTERM")
    p.add_argument("--max-calls", type=int, default=500_000, help="stop the traffic after this many calls and items")
    p.add_argument("--workers", type=int, default=16, help="concurrent unary callers")
    p.add_argument("--model-repository", default="", help="default: the bundled repository")
    p.add_argument("--model", default="", help="KServe model name (default: the only one served)")
    p.add_argument("--drain-delay", type=float, default=1.0)
    p.add_argument("--exit-timeout", type=float, default=30.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("server_args", nargs="*", help="more `serve` flags, after --")
    args = p.parse_args()
    return asyncio.run(soak(args))


if __name__ == "__main__":
    sys.exit(main())
