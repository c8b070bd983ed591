"""The drain before exit: admission alone, then the real server in this process (a model made slow so that
calls are in flight), then `python -m serving serve` under load from both APIs and three streams, stopped by
SIGTERM. Every accepted call must be answered OK, later calls get UNAVAILABLE, and nothing is lost."""

from __future__ import annotations

import asyncio
import queue
import re
import signal
import threading
import time
from collections import Counter

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.client import AsyncClassifierClient, ClassifierClient
from serving.engine.errors import ShuttingDown
from serving.server.drain import STREAM_CUT, Admission
from serving.wire.classifier.v1 import classifier_pb2_grpc
from serving.wire.inference import grpc_service_pb2 as kserve_pb
from serving.wire.inference import grpc_service_pb2_grpc as kserve_grpc
from tests.cli_run import ServeProcess
from tests.conftest import running_server

tg = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

IMAGE = np.zeros((28, 28), np.uint8)
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


# -- admission alone -------------------------------------------------------------------------------------------
def test_admission_refuses_after_close_and_waits_for_the_admitted():
    async def main():
        admission = Admission()
        admission.enter()
        admission.close()
        with pytest.raises(ShuttingDown):
            admission.enter()
        assert not await admission.wait_idle(0.05)  # one call still admitted
        asyncio.get_running_loop().call_later(0.05, admission.leave)
        assert await admission.wait_idle(5)

    asyncio.run(main())


def test_a_stream_stops_reading_at_close_and_knows_it_was_cut():
    async def requests(n: int, then_wait: bool):
        for i in range(n):
            yield i
        if then_wait:
            await asyncio.sleep(3600)  # a client that keeps its stream open

    async def read_all(reads) -> list[int]:
        return [m async for m in reads]

    async def main():
        admission = Admission()
        reads = admission.stream_reads(requests(3, then_wait=True))
        reader = asyncio.create_task(read_all(reads))
        await asyncio.sleep(0.01)  # three read, the reader now waits for a fourth
        admission.close()
        assert await asyncio.wait_for(reader, 5) == [0, 1, 2] and reads.cut
        finished = admission.stream_reads(requests(2, then_wait=False))  # the client closed its side first
        assert await read_all(finished) == [] and finished.cut  # nothing is read once closed
        # A reader cancelled for another reason (its client went away) is cancelled as before.
        other = Admission()
        task = asyncio.create_task(read_all(other.stream_reads(requests(1, then_wait=True))))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())


# -- the server in this process, with a slow model -------------------------------------------------------------
def slow_model(server, seconds: float) -> None:
    """The real sessions, each run made `seconds` longer: calls stay in flight long enough to watch."""
    sessions = server.server.repository.get("fmnist").sessions
    run = sessions.run

    def slow_run(*args, **kwargs):
        time.sleep(seconds)
        return run(*args, **kwargs)

    sessions.run = slow_run


def test_drain_answers_what_it_accepted_and_refuses_the_rest(small_repo):
    options = dict(batching_overrides={"inline_budget_us": 0, "max_batch_size": 2})
    with running_server(small_repo, **options) as server, ClassifierClient(server.address, retries=0) as client:
        slow_model(server, 0.1)  # batches of two, 100 ms each: the calls below take about 0.6 s to answer
        feed: queue.Queue = queue.Queue()
        for i in range(6):
            feed.put((str(i), [IMAGE]))

        def requests():
            while (item := feed.get()) is not None:
                yield item

        answered, ending = [], []

        def stream():
            try:
                answered.extend(client.classify_stream(requests()))
            except grpc.RpcError as e:
                ending.append(e)

        streaming = threading.Thread(target=stream)
        streaming.start()
        unary_channel = grpc.insecure_channel(server.address)  # calls left running while the test goes on
        classify = classifier_pb2_grpc.ClassifierStub(unary_channel).Classify
        unary = [classify.future(_request()) for _ in range(4)]
        time.sleep(0.05)
        drained = asyncio.run_coroutine_threadsafe(server.server.drain(delay_s=0.3, timeout_s=10), server.loop)
        time.sleep(0.05)
        with grpc.insecure_channel(server.address) as channel:  # during the delay: out of rotation, still answering
            check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
            ready = kserve_grpc.GRPCInferenceServiceStub(channel).ServerReady(kserve_pb.ServerReadyRequest())
        assert check.status == NOT_SERVING and not ready.ready
        unary.append(classify.future(_request()))  # accepted during the delay
        time.sleep(0.35)  # past the delay: new calls are refused, those accepted are still queued or running
        assert server.server.admission.in_flight > 0
        with pytest.raises(grpc.RpcError) as refused:
            client.classify([IMAGE])
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in refused.value.details()
        feed.put(("late", [IMAGE]))  # sent on the open stream after it stopped reading: not run
        assert drained.result(15) is True
        streaming.join(10)
        feed.put(None)
        assert [r.request_id for r in answered] == [str(i) for i in range(6)]
        assert all(not r.error_code for r in answered)
        assert ending and ending[0].code() == grpc.StatusCode.UNAVAILABLE and ending[0].details() == STREAM_CUT
        assert all(f.result().results for f in unary)
        unary_channel.close()


def _request():
    from serving.client import messages
    return messages.classify_request([IMAGE], "", 0, 1)


def test_the_client_retries_refusals_through_grpc_then_tries_the_next_target(small_repo):
    async def stop_accepting(server):
        server.admission.close()  # what the drain does after its delay: every call is refused

    with running_server(small_repo) as draining, running_server(small_repo) as serving:
        draining.call(stop_accepting(draining.server))
        with ClassifierClient([draining.address, serving.address], retries=3, backoff_s=0.01) as client:
            answers = [client.classify([IMAGE]) for _ in range(6)]
        assert all(len(a) == 1 for a in answers)
        # Calls 0, 2 and 4 start at the refusing target: gRPC's retry policy sends each there 4 times (the
        # first try and 3 retries), then the client tries the next target.
        assert draining.server.admission.refused == 3 * 4
        with ClassifierClient(draining.address, retries=0) as client, pytest.raises(grpc.RpcError) as refused:
            client.classify([IMAGE])
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE  # retries=0: no policy, one try
        assert draining.server.admission.refused == 3 * 4 + 1


def test_tritonclient_given_the_service_config_retries_refusals(small_repo):
    """The advice to tritonclient users in docs/reliability.md, as they would follow it: the retry policy's service config
    among the client's channel_args makes gRPC retry a refused ModelInfer."""
    from serving.client import service_config_option

    async def stop_accepting(server):
        server.admission.close()

    with running_server(small_repo) as server:
        server.call(stop_accepting(server.server))
        client = tg.InferenceServerClient(server.address, channel_args=[service_config_option()])
        x = tg.InferInput("input", [1, 1, 28, 28], "UINT8")
        x.set_data_from_numpy(np.zeros((1, 1, 28, 28), np.uint8))
        try:
            with pytest.raises(InferenceServerException) as refused:
                client.infer("fmnist", [x], client_timeout=30)
        finally:
            client.close()
        assert "UNAVAILABLE" in str(refused.value.status())
        assert server.server.admission.refused == 4  # the first try and the policy's 3 retries, all refused


def test_exit_timeout_cuts_what_is_still_running(small_repo):
    with running_server(small_repo, batching_overrides={"inline_budget_us": 0}) as server:
        slow_model(server, 1.5)
        with grpc.insecure_channel(server.address) as channel:
            call = classifier_pb2_grpc.ClassifierStub(channel).Classify.future(_request())
            time.sleep(0.2)
            assert server.call(server.server.drain(timeout_s=0.2)) is False
            server.call(server.server.close())
            with pytest.raises(grpc.RpcError) as cut:
                call.result(10)
            # gRPC's own word for a call cut at close ("Cancelling all calls"), not the drain's refusal.
            assert cut.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
            assert "shutting down" not in cut.value.details()


# -- `python -m serving serve` stopped by SIGTERM under load ---------------------------------------------------
def classify_loop(address: str, stop: threading.Event, outcomes: list) -> None:
    with ClassifierClient(address, retries=0, timeout_s=30) as client:
        while not stop.is_set():
            started = time.monotonic()
            try:
                client.classify([IMAGE] * 4)
                outcomes.append(("OK", started, "classifier.v1"))
            except grpc.RpcError as e:
                outcomes.append((e.code().name, started, f"classifier.v1: {e.details()}"))
                if e.code() == grpc.StatusCode.UNAVAILABLE:
                    return  # a real client retries on another replica


def triton_loop(address: str, stop: threading.Event, outcomes: list) -> None:
    client = tg.InferenceServerClient(address)
    x = tg.InferInput("input", [2, 1, 28, 28], "UINT8")
    x.set_data_from_numpy(np.zeros((2, 1, 28, 28), np.uint8))
    try:
        while not stop.is_set():
            started = time.monotonic()
            try:
                client.infer("fmnist", [x], client_timeout=30)
                outcomes.append(("OK", started, "tritonclient"))
            except InferenceServerException as e:
                code = str(e.status()).removeprefix("StatusCode.")
                outcomes.append((code, started, f"tritonclient: {e.message()}"))
                if code == "UNAVAILABLE":
                    return
    finally:
        client.close()


def stream_loop(address: str, stop: threading.Event, result: dict) -> None:
    """classifier.v1 ClassifyStream: one item every 5 ms until the server ends the stream."""
    sent = []

    def requests():
        n = 0
        while not stop.is_set():
            sent.append(str(n))
            yield str(n), [IMAGE]
            n += 1
            time.sleep(0.005)

    answers = result.setdefault("answers", [])
    with ClassifierClient(address, retries=0) as client:
        try:
            for r in client.classify_stream(requests(), window=8):
                answers.append((r.request_id, r.error_code))
            result["end"] = ("OK", "")
        except grpc.RpcError as e:
            result["end"] = (e.code().name, e.details())
    result["sent"] = sent


def aio_stream_loop(address: str, stop: threading.Event, result: dict) -> None:
    """The asyncio client's ClassifyStream (what batch jobs use): grpc.aio reports a stream ended while it is
    still writing as INTERNAL unless the server lets its writes land first (handlers.STREAM_END_PAUSE_S)."""
    answers = result.setdefault("answers", [])

    async def requests():
        n = 0
        while not stop.is_set():
            yield str(n), [IMAGE]
            n += 1
            await asyncio.sleep(0.005)

    async def main():
        async with AsyncClassifierClient(address, retries=0) as client:
            try:
                async for r in client.classify_stream(requests(), window=8):
                    answers.append((r.request_id, r.error_code))
                result["end"] = ("OK", "")
            except grpc.aio.AioRpcError as e:
                result["end"] = (e.code().name, e.details())

    asyncio.run(main())


def kserve_stream_loop(address: str, stop: threading.Event, result: dict) -> None:
    """KServe ModelStreamInfer through the wire stubs: one request every 5 ms until the server ends the stream."""
    answers = result.setdefault("answers", [])

    def requests():
        n = 0
        while not stop.is_set():
            yield kserve_pb.ModelInferRequest(
                model_name="fmnist", id=str(n),
                inputs=[kserve_pb.ModelInferRequest.InferInputTensor(name="input", datatype="UINT8", shape=[1, 1, 28, 28])],
                raw_input_contents=[bytes(784)])
            n += 1
            time.sleep(0.005)

    with grpc.insecure_channel(address) as channel:
        try:
            for r in kserve_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(requests()):
                answers.append((r.infer_response.id, r.error_message))
            result["end"] = ("OK", "")
        except grpc.RpcError as e:
            result["end"] = (e.code().name, e.details())


def health_watch(address: str, stop: threading.Event, seen: list) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while not stop.is_set():
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status
                seen.append((time.monotonic(), health_pb2.HealthCheckResponse.ServingStatus.Name(status)))
            except grpc.RpcError as e:
                seen.append((time.monotonic(), e.code().name))
                return
            time.sleep(0.005)


def lost(outcome: tuple[str, float, str]) -> bool:
    """A call the server accepted and did not answer. UNAVAILABLE is no loss when the server refused the call
    (shutting down) or the port was already closed (nothing was sent)."""
    code, _, details = outcome
    if code == "OK":
        return False
    return not (code == "UNAVAILABLE" and ("shutting down" in details or "connect" in details.lower()))


def test_sigterm_under_load_loses_nothing(small_repo):
    server = ServeProcess(small_repo, "--drain-delay", "0.5", "--max-queue-delay-us", "2000")
    stop, stop_watch = threading.Event(), threading.Event()
    unary: list = []
    stream, aio_stream, kserve_stream, health_seen = {}, {}, {}, []
    threads = ([threading.Thread(target=classify_loop, args=(server.address, stop, unary)) for _ in range(6)]
               + [threading.Thread(target=triton_loop, args=(server.address, stop, unary)) for _ in range(6)]
               + [threading.Thread(target=stream_loop, args=(server.address, stop, stream)),
                  threading.Thread(target=aio_stream_loop, args=(server.address, stop, aio_stream)),
                  threading.Thread(target=kserve_stream_loop, args=(server.address, stop, kserve_stream)),
                  threading.Thread(target=health_watch, args=(server.address, stop_watch, health_seen))])
    for t in threads:
        t.start()
    try:
        time.sleep(1.5)
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        returncode = server.proc.wait(30)
    finally:
        stop.set()
        stop_watch.set()
        for t in threads:
            t.join(30)
        if server.proc.poll() is None:
            server.proc.kill()
    log = server.log()
    assert returncode == 0, log
    codes = Counter(code for code, _, _ in unary)
    lost_calls = [o for o in unary if lost(o)]
    answered_after_signal = sum(1 for code, started, _ in unary if code == "OK" and started > signalled)
    in_flight = re.search(r"waiting up to \S+ for (\d+) call", log)
    print(f"\nunary calls: {dict(codes)}; answered after SIGTERM (drain delay): {answered_after_signal}; "
          f"in flight when new calls were refused: {in_flight and in_flight.group(1)}; lost: {len(lost_calls)}; "
          f"classifier stream: {len(stream.get('answers', []))} answered of {len(stream.get('sent', []))} sent, "
          f"ended {stream.get('end')}; asyncio client's stream: {len(aio_stream['answers'])} answered; KServe stream: "
          f"{len(kserve_stream['answers'])} answered")
    assert not lost_calls, lost_calls
    assert codes["OK"] > 50 and answered_after_signal > 0
    assert all(code in ("OK", "UNAVAILABLE") for code in codes)
    # Every stream: every item answered OK, in order; then the stream ends UNAVAILABLE (send the rest elsewhere).
    for result in (stream, aio_stream, kserve_stream):
        answers = result["answers"]
        assert answers and all(not error for _, error in answers), answers[:5]
        assert [int(i) for i, _ in answers] == list(range(len(answers)))
        assert result["end"] == ("UNAVAILABLE", STREAM_CUT), result["end"]
    # Health says NOT_SERVING before the port closes.
    statuses = [s for _, s in health_seen]
    assert "NOT_SERVING" in statuses, statuses[-5:]
    first_not_serving = statuses.index("NOT_SERVING")
    assert all(s == "SERVING" for s in statuses[:first_not_serving])
    assert all(s == "NOT_SERVING" for s in statuses[first_not_serving:-1])


def test_sigterm_under_tritonclient_aio_load_gives_only_ok_or_unavailable(small_repo):
    """32 tritonclient.grpc.aio callers without retries, each sending its next ModelInfer the moment the last
    one ends (refused or not), SIGTERM after 2 s. Calls keep arriving up to the last millisecond, so some are
    on their way when the server ends: they must end UNAVAILABLE (refused, the connection closed under them,
    or no server to connect to), never CANCELLED, INTERNAL or UNKNOWN, which no client retries."""
    import tritonclient.grpc.aio as triton_aio

    server = ServeProcess(small_repo, "--max-queue-delay-us", "2000")
    codes: Counter = Counter()
    unavailable: Counter = Counter()

    async def caller(stop: asyncio.Event) -> None:
        client = triton_aio.InferenceServerClient(server.address)
        x = tg.InferInput("input", [2, 1, 28, 28], "UINT8")
        x.set_data_from_numpy(np.zeros((2, 1, 28, 28), np.uint8))
        try:
            while not stop.is_set():
                try:
                    await client.infer("fmnist", [x], client_timeout=30)
                    codes["OK"] += 1
                except InferenceServerException as e:
                    code = str(e.status()).removeprefix("StatusCode.")
                    codes[code] += 1
                    if code == "UNAVAILABLE":
                        unavailable["refused" if "shutting down" in e.message() else
                                    "cut" if "Socket closed" in e.message() else "no server"] += 1
                    if server.proc.poll() is not None:
                        await asyncio.sleep(0.01)  # nothing to connect to: no need to spin
        finally:
            await client.close()

    async def main() -> float:
        stop = asyncio.Event()
        callers = [asyncio.create_task(caller(stop)) for _ in range(32)]
        await asyncio.sleep(2)
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        while server.proc.poll() is None and time.monotonic() - signalled < 30:
            await asyncio.sleep(0.01)
        exit_s = time.monotonic() - signalled
        await asyncio.sleep(0.3)  # callers meet the closed port too
        stop.set()
        await asyncio.gather(*callers)
        return exit_s

    try:
        exit_s = asyncio.run(main())
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
    print(f"\ncalls by status: {dict(codes)}; UNAVAILABLE: {dict(unavailable)}; exit {exit_s:.2f} s after SIGTERM")
    assert server.proc.returncode == 0, server.log()
    assert set(codes) <= {"OK", "UNAVAILABLE"}, codes
    assert codes["OK"] > 100 and unavailable["refused"] > 0
    assert exit_s < 5  # the quiet wait is bounded (2 s) however fast callers come back


def test_a_second_signal_exits_at_once(small_repo):
    server = ServeProcess(small_repo, "--drain-delay", "30")
    try:
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        returncode = server.proc.wait(15)
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
    assert time.monotonic() - started < 10
    assert returncode == 0, server.log()  # nothing was in flight, so nothing was cut
    assert "second signal" in server.log()
