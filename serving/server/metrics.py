"""Prometheus metrics on an HTTP port of their own: requests, server failures apart from client errors, queue
and compute time (also as Triton's per-request series), batch sizes, calls by method and status, in flight,
and the standard process_* and python_* series.

The port serves `GET /metrics` alone (anything else is 404), from aiohttp on the server's event loop:
prometheus_client's own server starts a thread per connection, so every idle connection to it held a
thread. Here an idle connection costs a socket and no thread, is closed after a few seconds, and the
exposition text is built in a worker thread so a scrape never stalls the gRPC calls on the loop.
"""

from __future__ import annotations

import asyncio

from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    multiprocess,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from ..engine.errors import InvalidInput, StartRefused

# No `_created` twin for every counter and histogram: it doubles the series and no dashboard reads it.
disable_created_metrics()

METRICS_PATH = "/metrics"
IDLE_TIMEOUT_S = 5.0  # a connection with no request for this long is closed

_TIME_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


# Series that map one to one onto Triton's nv_inference_* (per model and version): a histogram's _sum, in
# seconds, times 1e6 is Triton's cumulative _us counter, and its _count the requests it counts. The table
# is in docs/observability.md (Metrics); tests/server/test_metrics.py checks every name in it is served.
TRITON_NAMES = {
    "inference_request_success_total": "nv_inference_request_success",
    "inference_request_duration_seconds": "nv_inference_request_duration_us",
    "inference_queue_duration_seconds": "nv_inference_queue_duration_us",
    "inference_compute_input_duration_seconds": "nv_inference_compute_input_duration_us",
    "inference_compute_infer_duration_seconds": "nv_inference_compute_infer_duration_us",
    "inference_compute_output_duration_seconds": "nv_inference_compute_output_duration_us",
    "inference_count_total": "nv_inference_count",
    "inference_exec_count_total": "nv_inference_exec_count",
}


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # The standard process_* (CPU, memory, open files) and python_* (GC, version) series.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        labels = ["model", "version"]
        r = self.registry
        self.requests = Counter("inference_requests_total", "Requests executed by the model (per batch share)",
                                labels, registry=r)
        self.failures = Counter("inference_failures_total", "Requests the server failed to answer (its fault, "
                                "not the caller's: see inference_client_errors_total)", labels, registry=r)
        self.client_errors = Counter("inference_client_errors_total", "Requests refused for the caller's input "
                                     "(an image that does not decode, a wrong shape)", labels, registry=r)
        self.rpcs = Counter("grpc_requests_total", "gRPC calls by method and status code", ["method", "code"],
                            registry=r)
        self.queue_time = Histogram("inference_queue_seconds", "Time a request waited in the batcher queue",
                                    labels, buckets=_TIME_BUCKETS, registry=r)
        self.compute_time = Histogram("inference_compute_seconds", "Time of one batch execution",
                                      labels, buckets=_TIME_BUCKETS, registry=r)
        self.batch_size = Histogram("inference_batch_size", "Images per executed batch", labels,
                                    buckets=_BATCH_BUCKETS, registry=r)
        # livesum: with `serve --workers N` the workers' gauges are summed over the live ones (the supervisor's
        # scrape); in one process the mode is ignored.
        self.in_flight = Gauge("grpc_requests_in_flight", "gRPC calls being served now", ["method"], registry=r,
                               multiprocess_mode="livesum")
        # Triton's per-request series (successful requests; the compute phases are each request's share).
        self.success = Counter("inference_request_success_total", "Requests answered successfully", labels,
                               registry=r)
        self.images = Counter("inference_count_total", "Images inferred (batch units)", labels, registry=r)
        self.executions = Counter("inference_exec_count_total", "Batch executions", labels, registry=r)
        self.durations = [
            Histogram(name, doc, labels, buckets=_TIME_BUCKETS, registry=r) for name, doc in (
                ("inference_request_duration_seconds", "A successful request's time from submit to answer"),
                ("inference_queue_duration_seconds", "A successful request's time queued in the batcher"),
                ("inference_compute_input_duration_seconds", "A successful request's share of preprocessing"),
                ("inference_compute_infer_duration_seconds", "A successful request's share of the model run"),
                ("inference_compute_output_duration_seconds", "A successful request's share of softmax, ranking, CAM"),
            )]
        self.endpoint = MetricsEndpoint(self.registry)

    @property
    def port(self) -> int:
        return self.endpoint.port

    def series(self, model: str, version: int) -> VersionMetrics:
        """The series of one model version, fed by its statistics (`statistics.SeriesSink`)."""
        return VersionMetrics(self, model, str(version))

    async def serve(self, port: int, host: str = "127.0.0.1") -> None:
        await self.endpoint.serve(port, host)

    async def close(self) -> None:
        await self.endpoint.close()


class MetricsEndpoint:
    """`GET /metrics` of one registry on an HTTP port: a server's own, or the workers' of `serve --workers N`
    gathered by the supervisor (`workers_registry`)."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def serve(self, port: int, host: str = "127.0.0.1") -> None:
        """Serve /metrics on host:port (IPv6 addresses too); StartRefused, naming the flag, if it cannot bind."""
        app = web.Application()
        app.router.add_get(METRICS_PATH, self._scrape)
        self._runner = web.AppRunner(app, access_log=None, keepalive_timeout=IDLE_TIMEOUT_S,
                                     handle_signals=False)
        await self._runner.setup()
        host = host.strip("[]")
        # "::" means every address, IPv4 included, as it does for gRPC; asyncio would bind it IPv6-only.
        site = web.TCPSite(self._runner, None if host == "::" else host, port)
        try:
            await site.start()
        except OSError as e:
            await self.close()
            raise StartRefused(f"--metrics-port {port} on {host}: {e.strerror or e}") from None
        self.port = self._runner.addresses[0][1]

    async def _scrape(self, request: web.Request) -> web.Response:
        body = await asyncio.to_thread(generate_latest, self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def workers_registry(directory: str) -> CollectorRegistry:
    """The series of every worker of `serve --workers N`, summed (prometheus_client's multiprocess mode: each
    worker writes its values to files under `directory`, its PROMETHEUS_MULTIPROC_DIR), and the supervisor's
    own python_* series. The process_* series are per process, so they are left out here."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)
    PlatformCollector(registry=registry)
    return registry


class VersionMetrics:
    """One version's series, their labels bound once (a labelled child per observation costs a dict lookup)."""

    def __init__(self, m: Metrics, model: str, version: str):
        at = lambda metric: metric.labels(model, version)  # noqa: E731
        self.queue, self.compute, self.size = at(m.queue_time), at(m.compute_time), at(m.batch_size)
        self.requests, self.failures, self.client_errors = at(m.requests), at(m.failures), at(m.client_errors)
        self.success, self.images, self.executions = at(m.success), at(m.images), at(m.executions)
        self.total, self.queued, self.compute_input, self.compute_infer, self.compute_output = (
            at(h) for h in m.durations)

    def batch(self, units: int, queue_times: list[float], compute_s: float, errors: list[BaseException]) -> None:
        self.requests.inc(len(queue_times))
        if errors:
            client = sum(isinstance(e, InvalidInput) for e in errors)
            if client:
                self.client_errors.inc(client)
            if client < len(errors):
                self.failures.inc(len(errors) - client)
        for t in queue_times:
            self.queue.observe(t)
        self.compute.observe(compute_s)
        self.size.observe(units)
        self.images.inc(units)
        self.executions.inc()

    def request(self, total_s: float, queue_s: float, phases: tuple[float, float, float]) -> None:
        self.success.inc()
        self.total.observe(total_s)
        self.queued.observe(queue_s)
        self.compute_input.observe(phases[0])
        self.compute_infer.observe(phases[1])
        self.compute_output.observe(phases[2])
