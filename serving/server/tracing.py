"""OpenTelemetry tracing of calls through the batcher: off by default, and free when off.

Per call of our services, a server span (`CallGate` starts it, continuing the caller's W3C `traceparent`
from the gRPC metadata) carries the model, version and image count, and its gRPC status (any status but
OK is an error). Per request the batcher queued, a `queue` span (a child of the call) runs from its submit
to the start of its batch. Per batch execution, a `batch` span with the batch size and the duration of its
phases (`preprocess`, `run` for onnxruntime, `postprocess` for softmax, ranking and CAM) is **linked** to
the call spans it served; its parent is the first of them, so a trace of one call shows the batch it ran
in, and the others reach it by their link. A batch none of whose calls is sampled makes no span.

The sampling is decided when a call starts, before anything is made: an unsampled call makes no span.
Every span is built finished, when what it measures is over (a call's span when the call ends; queue and
batch spans on the event loop after the batch ran, with the batcher's timestamps), and handed to the SDK's
batch span processor and OTLP exporter: a live SDK span per span cost several times more, and the worker
thread that runs onnxruntime never touches the SDK.

When off (the default: no `--trace`, or level OFF), no SDK is imported and a call costs one attribute
read. The SDK and the OTLP exporter are the `[trace]` extra; they read the standard `OTEL_*` variables
(`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_SERVICE_NAME`, `OTEL_TRACES_EXPORTER`, `OTEL_TRACES_SAMPLER` and
`_ARG`). `TraceSetting` changes the level and the rate while the server runs.
"""

from __future__ import annotations

import contextvars
import os
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..engine.errors import StartRefused

TRACE_EXTRA_HINT = "tracing needs the OpenTelemetry SDK: pip install 'cnn-serving[trace]'"
DEFAULT_SERVICE_NAME = "cnn-serving"
PHASES = ("preprocess", "run", "postprocess")  # of a batch: decode and resize, onnxruntime, softmax/ranking/CAM
LEVELS = ("OFF", "TIMESTAMPS")  # Triton's trace levels that mean off and on (its TENSORS level is not served)

# The span of the call being served, for the model's attributes, the batcher's links and the log lines.
# Our own variable: cheaper than attaching an OpenTelemetry context per call, and read by nothing else.
call_span: contextvars.ContextVar = contextvars.ContextVar("call_span", default=None)


@dataclass
class TraceConfig:
    """How tracing starts. `rate` is Triton's: one request in `rate` is sampled (1: every one); 0 takes the
    sampler from OTEL_TRACES_SAMPLER/_ARG (default: every request, or as the caller's traceparent says)."""
    enabled: bool = False
    rate: int = 0
    endpoint: str = ""  # the OTLP/gRPC collector; "" leaves it to OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT

    @classmethod
    def parse(cls, settings: Iterable[str], enabled: bool = False) -> TraceConfig:
        """Triton-like `--trace-config` settings: `level=OFF|TIMESTAMPS`, `rate=N`, `mode=opentelemetry`,
        `opentelemetry,url=HOST:PORT` (or `url=`). Raises ValueError naming a bad one."""
        config = cls(enabled=enabled)
        for setting in settings:
            key, sep, value = setting.partition("=")
            key = key.strip().lower().removeprefix("opentelemetry,")
            if not sep:
                raise StartRefused(f"--trace-config {setting!r}: use key=value (level, rate, mode or url)")
            if key == "level":
                if value.upper() not in LEVELS:
                    raise StartRefused(f"--trace-config level={value}: choose OFF or TIMESTAMPS")
                config.enabled = value.upper() != "OFF"
            elif key == "rate":
                if not value.isdigit() or int(value) < 1:
                    raise StartRefused(f"--trace-config rate={value}: one request in N is traced, N >= 1")
                config.rate = int(value)
            elif key == "mode":
                if value.lower() != "opentelemetry":
                    raise StartRefused(f"--trace-config mode={value}: only opentelemetry is served")
            elif key == "url":
                config.endpoint = value
            else:
                raise StartRefused(f"--trace-config {key}: unknown (level, rate, mode, url)")
        return config


def _sampler_from_environment() -> tuple[float, bool]:
    """(ratio, follows the caller's sampled flag) from OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG."""
    name = os.environ.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
    try:
        arg = float(os.environ.get("OTEL_TRACES_SAMPLER_ARG", "1.0"))
    except ValueError:
        arg = 1.0
    ratios = {"always_on": 1.0, "always_off": 0.0, "traceidratio": min(max(arg, 0.0), 1.0)}
    base = name.removeprefix("parentbased_")
    if base not in ratios:
        raise StartRefused(f"OTEL_TRACES_SAMPLER={name}: served are always_on, always_off, traceidratio and their "
                         "parentbased_ forms")
    return ratios[base], name.startswith("parentbased_")


class Tracing:
    """The server's tracing: its state (on, sampling ratio) and, once on, an SDK tracer provider with an
    OTLP exporter. One per server; the provider is its own, not the global one."""

    def __init__(self, config: TraceConfig | None = None):
        self.config = config or TraceConfig()
        self.on = False
        self.provider = None  # the SDK's TracerProvider, once tracing was switched on
        try:
            self.ratio, self.parent_based = _sampler_from_environment()
        except ValueError:
            if self.config.enabled:
                raise
            self.ratio, self.parent_based = 1.0, True  # off: an unknown sampler stops nothing
        if self.config.rate:
            self.ratio = 1.0 / self.config.rate
        self._start_ratio = self.ratio
        if self.config.enabled:
            self.enable()

    # -- switching -------------------------------------------------------------------------------------
    def enable(self) -> None:
        """Start (or resume) tracing; RuntimeError when the SDK is not installed."""
        if self.provider is None:
            self.provider, self._processors = _make_provider(self.config.endpoint)
            from opentelemetry.sdk.util.instrumentation import InstrumentationScope
            self._resource, self._scope = self.provider.resource, InstrumentationScope("serving.server")
        self.on = True

    def disable(self) -> None:
        self.on = False

    def set_ratio(self, ratio: float) -> None:
        self.ratio = min(max(ratio, 0.0), 1.0)

    def reset_ratio(self) -> None:
        self.set_ratio(self._start_ratio)

    @property
    def rate(self) -> int:
        """Triton's trace_rate: one request in this many (0 when none is sampled)."""
        return round(1 / self.ratio) if self.ratio > 0 else 0

    def shutdown(self) -> None:
        """Export what is buffered and stop the exporter."""
        self.on = False
        if self.provider is not None:
            self.provider.shutdown()
            self.provider = None

    # -- spans of a call -------------------------------------------------------------------------------
    def start_call(self, method: str, metadata: Sequence[tuple[str, str | bytes]] | None) -> CallSpan | None:
        """The server span of one call, continuing the caller's traceparent; None when tracing is off or the
        call is not sampled. The sampling is decided here, before anything else is made, so an unsampled
        call costs a metadata scan and a random number: at 1% the other 99% make no span at all."""
        carrier = None
        for key, value in metadata or ():
            if key in ("traceparent", "tracestate") and isinstance(value, str):
                carrier = carrier or {}
                carrier[key] = value
        parent = get_current_span(_PROPAGATOR.extract(carrier)).get_span_context() if carrier else None
        if parent is not None and not parent.is_valid:
            parent = None
        if parent is not None and self.parent_based:
            if not parent.trace_flags.sampled:  # the caller decided: not sampled
                return None
        elif self.ratio < 1.0 and random.random() >= self.ratio:
            return None
        trace_id = parent.trace_id if parent is not None else (random.getrandbits(128) or 1)
        state = parent.trace_state if parent is not None else None
        return CallSpan(method, SpanContext(trace_id, random.getrandbits(64) or 1, False, _SAMPLED, state), parent,
                        time.time_ns())

    def end_call(self, span: CallSpan, code: str, details: str | bytes | None = "") -> None:
        """End a call's span with its gRPC status; any status but OK marks it an error."""
        status = _UNSET
        if code != "OK":
            if isinstance(details, bytes):
                details = details.decode("utf-8", "replace")
            status = Status(StatusCode.ERROR, f"{code}: {details or ''}".rstrip(": "))
        attributes = span.attributes
        attributes["rpc.system"], attributes["rpc.method"], attributes["rpc.grpc.status_code"] = "grpc", span.name, code
        self._finish(ReadableSpan(span.name, span.context, span.parent, self._resource, attributes,
                                  kind=SpanKind.SERVER, status=status, start_time=span.start_ns,
                                  end_time=time.time_ns(), instrumentation_scope=self._scope))

    # -- spans of a batch (the batcher's tracer hook) --------------------------------------------------
    def capture(self):
        """At submit: the call's span when it is traced and sampled, else None (the batcher then does nothing)."""
        if not self.on:
            return None
        return call_span.get()

    def batch_ran(self, name: str, calls: Sequence, enqueued_ns: Sequence[int], started_ns: int, ended_ns: int,
                  units: int, phases: tuple[float, float, float], failures: int, error: BaseException | None) -> None:
        """The queue span of every sampled request of one batch, and the batch span linked to their calls.

        These spans are over when they are made (their timestamps are the batcher's), so they are built as
        finished spans and handed to the exporter directly: a live SDK span (sampler, locks, attribute
        checks) would cost several times more, per request, for nothing."""
        finish, resource, scope, bits = self._finish, self._resource, self._scope, random.getrandbits
        sampled = []
        for span, enqueued in zip(calls, enqueued_ns):
            if span is None:  # not traced (captured only when sampled; it may have ended since: a cancelled caller)
                continue
            call = span.context
            sampled.append(call)
            finish(ReadableSpan("queue", SpanContext(call.trace_id, bits(64), False, _SAMPLED), call, resource,
                                start_time=enqueued, end_time=started_ns, instrumentation_scope=scope))
        if not sampled:
            return
        first = sampled[0]
        attributes = {"batcher": name, "batch.size": units, "batch.requests": len(calls),
                      "batch.failed_requests": failures}
        # The phases are attributes, not child spans: three more spans per batch would double what the
        # exporter encodes per request when batches are small.
        for phase, seconds in zip(PHASES, phases):
            attributes[f"batch.{phase}.duration_s"] = seconds
        status = Status(StatusCode.ERROR, f"{type(error).__name__}: {error}") if error is not None else _UNSET
        finish(ReadableSpan("batch", SpanContext(first.trace_id, bits(64), False, _SAMPLED), first, resource,
                            attributes, links=[Link(c) for c in sampled], status=status, start_time=started_ns,
                            end_time=max(ended_ns, started_ns + int(sum(phases) * 1e9)),
                            instrumentation_scope=scope))

    def add_span_processor(self, processor) -> None:
        """Another destination for every span (tests keep them in memory)."""
        self.provider.add_span_processor(processor)
        self._processors.append(processor)

    def _finish(self, span) -> None:
        for processor in self._processors:
            processor.on_end(span)


def set_call_attributes(model: str, version: int, images: int) -> None:
    span = call_span.get()
    if span is not None:
        span.attributes.update({"model.name": model, "model.version": version, "request.images": images})


def trace_ids() -> tuple[str, str] | None:
    """The current call's (trace id, span id) in hex, for log lines; None outside a traced call."""
    span = call_span.get()
    if span is None:
        return None
    return f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}"


_PROPAGATOR = None


class CallSpan:
    """A call's span while the call runs: its context (what logs, the batcher and the batch's links read), its
    parent, start and attributes. It becomes an SDK span, finished, when the call ends (`end_call`): a live
    SDK span (sampler, locks, checks on every attribute) cost about 4 times as much per call."""
    __slots__ = ("name", "context", "parent", "start_ns", "attributes")

    def __init__(self, name: str, context, parent, start_ns: int):
        self.name, self.context, self.parent, self.start_ns, self.attributes = name, context, parent, start_ns, {}


# OpenTelemetry's names, bound when tracing is first switched on (the base install has none of them).
get_current_span = SpanContext = ReadableSpan = Link = Status = StatusCode = SpanKind = None
_SAMPLED = _UNSET = None  # TraceFlags(SAMPLED) and Status(UNSET)


def _make_provider(endpoint: str):
    global _PROPAGATOR
    try:
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
        from opentelemetry.sdk.trace.sampling import ALWAYS_ON
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    except ImportError as e:
        raise StartRefused(f"{TRACE_EXTRA_HINT} ({e})") from None
    _PROPAGATOR = TraceContextTextMapPropagator()
    global get_current_span, SpanContext, ReadableSpan, Link, Status, StatusCode, SpanKind, _SAMPLED, _UNSET
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags, get_current_span
    _SAMPLED, _UNSET = TraceFlags(TraceFlags.SAMPLED), Status(StatusCode.UNSET)
    # Every span asked for is recorded: a call's sampling is decided in start_call, and the spans of its
    # queue wait and batch exist only for sampled calls.
    sampler = ALWAYS_ON
    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: DEFAULT_SERVICE_NAME}
    provider = TracerProvider(resource=Resource.create(attributes), sampler=sampler)
    exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
    if exporter_name == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError as e:
            raise StartRefused(f"{TRACE_EXTRA_HINT} ({e})") from None
        try:  # the same exporter with a faster encoder, built on the exporter's internal helpers
            from .span_encoding import FastOTLPSpanExporter as OTLPSpanExporter  # noqa: F811
        except ImportError:  # an exporter release that moved them: its own encoder then
            pass
        exporter = OTLPSpanExporter(endpoint=endpoint, insecure=not endpoint.startswith("https")) if endpoint \
            else OTLPSpanExporter()
        processors = [BatchSpanProcessor(exporter)]
    elif exporter_name == "console":
        processors = [BatchSpanProcessor(ConsoleSpanExporter())]
    elif exporter_name == "none":
        processors = []
    else:
        raise StartRefused(f"OTEL_TRACES_EXPORTER={exporter_name}: served are otlp, console and none")
    for processor in processors:
        provider.add_span_processor(processor)
    return provider, processors
