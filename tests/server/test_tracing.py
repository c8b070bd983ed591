"""OpenTelemetry tracing, end to end: the real server exports over OTLP/gRPC to a real receiver (a gRPC
TraceService from opentelemetry-proto, started here); callers are the project's client inside spans of
their own, so their trace context travels in the gRPC metadata as a real caller's would."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
from opentelemetry.sdk.trace import TracerProvider

from serving.client import ClassifierClient
from serving.engine.errors import StartRefused
from serving.server.tracing import TraceConfig
from serving.wire.inference import grpc_service_pb2 as kpb
from serving.wire.inference import grpc_service_pb2_grpc as kpb_grpc
from tests.conftest import ramp_images, running_server
from tests.server.otlp_receiver import OtlpReceiver

CLASSIFY = "classifier.v1.Classifier/Classify"
SERVER_KIND = 2  # SPAN_KIND_SERVER in OTLP
CALLERS = 12
# A long queue delay gathers the concurrent callers into few batches (the point of the test is batching).
BATCHING = {"max_queue_delay_us": 50_000, "max_batch_size": 16}


def call_concurrently(address: str, n: int, images_of) -> dict[int, tuple[str, str]]:
    """n callers at once, each inside a span of its own tracer; (trace id, span id) of each caller's span."""
    tracer = TracerProvider().get_tracer("test-caller")
    callers: dict[int, tuple[str, str]] = {}
    start = threading.Barrier(n)
    errors = []

    def one(i: int) -> None:
        try:
            with ClassifierClient(address) as client, tracer.start_as_current_span("caller") as span:
                ctx = span.get_span_context()
                callers[i] = (f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}")
                start.wait(10)
                client.classify(images_of(i))
        except Exception as e:  # noqa: BLE001 - reported by the test thread below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return callers


def test_a_batched_run_links_each_call_from_exactly_one_batch(small_repo):
    images, _ = ramp_images(3 * CALLERS, seed=1)
    with OtlpReceiver() as receiver:
        with running_server(small_repo, trace=TraceConfig(enabled=True, endpoint=receiver.endpoint),
                            batching_overrides=BATCHING) as server:
            callers = call_concurrently(server.address, CALLERS, lambda i: list(images[3 * i:3 * i + 1 + i % 3]))
        # Stopping the server flushed its exporter: every span has arrived.
    spans = receiver.spans
    calls = [s for s in spans if s.name == CLASSIFY]
    batches = [s for s in spans if s.name == "batch"]
    queues = [s for s in spans if s.name == "queue"]
    assert len(calls) == CALLERS and all(s.kind == SERVER_KIND and s.service == "cnn-serving" for s in calls)

    # The caller's trace is continued: each call span is a child of one caller's span, in its trace.
    assert sorted((c.trace_id, c.parent_span_id) for c in calls) == sorted(callers.values())
    for c in calls:
        assert c.attributes["model.name"] == "fmnist" and c.attributes["model.version"] == 1
        assert c.attributes["rpc.grpc.status_code"] == "OK" and c.status_code != 2
    images_sent = {c.span_id: c.attributes["request.images"] for c in calls}
    assert sorted(images_sent.values()) == sorted(1 + i % 3 for i in range(CALLERS))

    # Each call span is linked from exactly one batch span, whose size is the images of the calls it served.
    linked: dict[str, int] = {}
    for b in batches:
        for _, span_id in b.links:
            linked[span_id] = linked.get(span_id, 0) + 1
        assert b.attributes["batch.size"] == sum(images_sent[span_id] for _, span_id in b.links)
        assert b.attributes["batch.requests"] == len(b.links)
        # The batch is a child of one call it served (so that call's trace shows it), phases inside it.
        assert (b.trace_id, b.parent_span_id) in {(c.trace_id, c.span_id) for c in calls if (c.trace_id, c.span_id) in b.links}
        # Its phases (decode, onnxruntime, softmax and ranking) are in it, as durations.
        phases = [b.attributes[f"batch.{p}.duration_s"] for p in ("preprocess", "run", "postprocess")]
        assert all(p >= 0 for p in phases) and phases[1] > 0
        assert sum(phases) * 1e9 <= b.end_ns - b.start_ns + 1000
    assert linked == {c.span_id: 1 for c in calls}
    assert len(batches) < CALLERS, "the concurrent callers were not batched together"

    # One queue span per call, inside it: queue time <= the call's total time.
    assert len(queues) == CALLERS
    by_id = {c.span_id: c for c in calls}
    for q in queues:
        call = by_id[q.parent_span_id]
        assert q.trace_id == call.trace_id
        assert call.start_ns <= q.start_ns <= q.end_ns <= call.end_ns
        assert q.end_ns - q.start_ns <= call.end_ns - call.start_ns


def test_a_failed_call_sets_its_span_status(small_repo):
    with OtlpReceiver() as receiver:
        with running_server(small_repo, trace=TraceConfig(enabled=True, endpoint=receiver.endpoint)) as server, \
                ClassifierClient(server.address) as client:
            with pytest.raises(grpc.RpcError):
                client.classify([b"not an image"])
    (call,) = [s for s in receiver.spans if s.name == CLASSIFY]
    assert call.status_code == 2 and call.status_message.startswith("INVALID_ARGUMENT")
    assert call.attributes["rpc.grpc.status_code"] == "INVALID_ARGUMENT"


def test_with_tracing_off_no_span_is_made_and_nothing_exported(small_repo, monkeypatch):
    # Even with the standard variables pointing at a receiver, and callers sending traceparent.
    with OtlpReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        with running_server(small_repo, batching_overrides=BATCHING) as server:
            call_concurrently(server.address, 4, lambda i: [np.zeros((28, 28), np.uint8)])
            tracing = server.server.tracing
            assert not tracing.on and tracing.provider is None  # no SDK provider: no span can have been made
    assert receiver.spans == [] and receiver.exports == 0


def _kserve(address: str):
    channel = grpc.insecure_channel(address)
    return channel, kpb_grpc.GRPCInferenceServiceStub(channel)


def _setting(stub, token: str, **settings) -> dict[str, list[str]]:
    request = kpb.TraceSettingRequest(settings={k: kpb.TraceSettingRequest.SettingValue(value=v)
                                                for k, v in settings.items()})
    reply = stub.TraceSetting(request, metadata=(("authorization", f"Bearer {token}"),), timeout=10)
    return {k: list(v.value) for k, v in reply.settings.items()}


def test_trace_setting_switches_tracing_and_sampling_at_run_time_admin_only(small_repo):
    images = [np.zeros((28, 28), np.uint8)]
    auth = (("authorization", "Bearer user"),)
    with OtlpReceiver() as receiver:
        with running_server(small_repo, inference_tokens=("user",), admin_tokens=("admin",),
                            trace=TraceConfig(endpoint=receiver.endpoint)) as server, \
                ClassifierClient(server.address, token="user") as client:
            channel, stub = _kserve(server.address)
            with pytest.raises(grpc.RpcError) as refused:
                stub.TraceSetting(kpb.TraceSettingRequest(), metadata=auth, timeout=10)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert _setting(stub, "admin")["trace_level"] == ["OFF"]
            client.classify(images)  # off: not traced
            on = _setting(stub, "admin", trace_level=["TIMESTAMPS"], trace_rate=["1"])
            assert on["trace_level"] == ["TIMESTAMPS"] and on["trace_rate"] == ["1"]
            client.classify(images)
            client.classify(images)
            # No caller's context here, so the rate decides: one in a billion samples (about) none.
            assert _setting(stub, "admin", trace_rate=["1000000000"])["trace_rate"] == ["1000000000"]
            for _ in range(5):
                client.classify(images)
            assert _setting(stub, "admin", trace_level=["OFF"])["trace_level"] == ["OFF"]
            client.classify(images)
            with pytest.raises(grpc.RpcError) as bad:
                _setting(stub, "admin", trace_rate=["0"])
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            channel.close()
    calls = [s for s in receiver.spans if s.name == CLASSIFY]
    assert len(calls) == 2
    # The settings calls themselves are traced while tracing is on (the one switching it on is not).
    assert {s.name for s in receiver.spans} >= {CLASSIFY, "queue", "batch", "inference.GRPCInferenceService/TraceSetting"}


def test_the_fast_encoder_gives_the_sdk_encoders_message(monkeypatch):
    # Spans of every shape the server makes (a caller's remote parent with trace state, an error status, a
    # batch with links and phases, each attribute type), made by the server's own Tracing.
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from serving.server.span_encoding import encode
    from serving.server.tracing import Tracing, call_span

    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")  # the spans are kept in memory here, not sent
    tracing = Tracing(TraceConfig(enabled=True))
    memory = InMemorySpanExporter()
    tracing.add_span_processor(SimpleSpanProcessor(memory))
    try:
        calls = []
        for i, code in enumerate(("OK", "INVALID_ARGUMENT", "OK")):
            metadata = ((("traceparent", f"00-{i + 1:032x}-{i + 7:016x}-01"), ("tracestate", "vendor=abc"))
                        if i == 0 else ())
            span = tracing.start_call(CLASSIFY, metadata)
            token = call_span.set(span)
            span.attributes.update({"model.name": "fmnist", "model.version": 3, "score": 0.5, "cam": True,
                                    "label": "naïve ✓"})
            call_span.reset(token)
            calls.append(span)
            tracing.end_call(span, code, "bad image" if code != "OK" else "")
        tracing.batch_ran("fmnist:3", calls, [10, 20, 30], 40, 90, 4, (0.00001, 0.00002, 0.00001), 1,
                          RuntimeError("boom"))
        spans = memory.get_finished_spans()
        assert len(spans) == 3 + 3 + 1  # calls, queue waits, the batch
        assert encode(spans) == encode_spans(spans)
    finally:
        tracing.shutdown()


def test_trace_flags_parse_as_tritons_and_from_their_variables():
    import argparse

    from serving.server import cli

    assert TraceConfig.parse(["level=TIMESTAMPS", "rate=100", "mode=opentelemetry",
                              "opentelemetry,url=collector:4317"]) == TraceConfig(True, 100, "collector:4317")
    assert TraceConfig.parse(["level=OFF"], enabled=True).enabled is False
    for bad, words in (("rate=0", "N >= 1"), ("level=TENSORS", "OFF or TIMESTAMPS"), ("mode=triton", "opentelemetry"),
                       ("rate", "key=value"), ("file=x", "unknown")):
        with pytest.raises(StartRefused, match=words):
            TraceConfig.parse([bad])
    # A repeatable flag from its variable: the settings apart by spaces; the command line adds to them.
    parser = argparse.ArgumentParser()
    cli.serve_arguments(parser)
    cli.apply_environment(parser, {"CNN_SERVING_TRACE_CONFIG": "rate=10 level=TIMESTAMPS", "CNN_SERVING_LOG_LEVEL": "debug"})
    args = parser.parse_args(["--trace-config", "url=c:4317"])
    assert cli.server_options(args).trace == TraceConfig(True, 10, "c:4317") and args.log_level == "DEBUG"


def test_the_async_client_inside_a_batch_job_span_joins_the_jobs_trace(small_repo, monkeypatch):
    # The batch job's span (job_span, configured by the standard variables) and the asyncio client's calls
    # inside it: the server's call spans carry the job's trace id, and the job's span reaches the receiver.
    import asyncio

    from serving.client import AsyncClassifierClient
    from serving.client.tracecontext import job_span

    with OtlpReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        with running_server(small_repo, trace=TraceConfig(enabled=True)) as server:
            async def job() -> None:
                async with AsyncClassifierClient(server.address) as client:
                    await asyncio.gather(*(client.classify([np.zeros((28, 28), np.uint8)]) for _ in range(3)))

            with job_span("batch job", model="fmnist"):
                asyncio.run(job())
    (job,) = [s for s in receiver.spans if s.name == "batch job"]
    calls = [s for s in receiver.spans if s.name == CLASSIFY]
    assert job.service == "cnn-serving-job" and job.attributes["model"] == "fmnist"
    assert len(calls) == 3 and {(c.trace_id, c.parent_span_id) for c in calls} == {(job.trace_id, job.span_id)}
