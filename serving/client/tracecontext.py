"""W3C trace context on the client's calls, when OpenTelemetry is installed (the `[trace]` extra; the base
install has none of it and sends nothing).

Inside a span of the caller's own tracing, every call carries `traceparent` (and `tracestate`) in its
metadata, so the server's spans join the caller's trace. Outside one, nothing is added.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

try:
    from opentelemetry import propagate as _propagate
    from opentelemetry import trace as _trace
except ImportError:  # the base install
    _propagate = _trace = None

Metadata = tuple[tuple[str, str], ...]


def with_trace_context(metadata: Metadata | None) -> Metadata | None:
    """The call's metadata, plus the current span's trace context when there is one."""
    if _trace is None or not _trace.get_current_span().get_span_context().is_valid:
        return metadata
    carrier: dict[str, str] = {}
    _propagate.inject(carrier)
    return (*(metadata or ()), *carrier.items())


@contextlib.contextmanager
def job_span(name: str, **attributes) -> Iterator[None]:
    """A span around a whole batch job, current while it runs, so that every call of the job joins its
    trace. Only where the SDK is installed and an exporter is configured by the standard variables
    (OTEL_TRACES_EXPORTER other than none, or OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT); otherwise nothing."""
    exporter = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if _trace is None or exporter == "none" or not (exporter or endpoint):
        yield
        return
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        yield
        return
    provider = TracerProvider(resource=Resource.create(
        {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": "cnn-serving-job"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    try:
        with provider.get_tracer("serving.jobs").start_as_current_span(name, attributes=attributes):
            yield
    finally:
        provider.shutdown()
