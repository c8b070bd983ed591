"""Prometheus metrics on an HTTP port of their own: requests, failures, queue and compute time, batch sizes,
calls by method and status, in flight.

The port serves `GET /metrics` alone (anything else is 404), from aiohttp on the server's event loop:
prometheus_client's own server starts a thread per connection, so every idle connection to it held a
thread. Here an idle connection costs a socket and no thread, is closed after a few seconds, and the
exposition text is built in a worker thread so a scrape never stalls the gRPC calls on the loop.
"""

from __future__ import annotations

import asyncio

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

METRICS_PATH = "/metrics"
IDLE_TIMEOUT_S = 5.0  # a connection with no request for this long is closed

_TIME_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ["model", "version"]
        self.requests = Counter("inference_requests_total", "Requests executed by the model (per batch share)",
                                labels, registry=self.registry)
        self.failures = Counter("inference_failures_total", "Requests the model could not answer", labels,
                                registry=self.registry)
        self.rpcs = Counter("grpc_requests_total", "gRPC calls by method and status code", ["method", "code"],
                            registry=self.registry)
        self.queue_time = Histogram("inference_queue_seconds", "Time a request waited in the batcher queue",
                                    labels, buckets=_TIME_BUCKETS, registry=self.registry)
        self.compute_time = Histogram("inference_compute_seconds", "Time of one batch execution",
                                      labels, buckets=_TIME_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("inference_batch_size", "Images per executed batch", labels,
                                    buckets=_BATCH_BUCKETS, registry=self.registry)
        self.in_flight = Gauge("grpc_requests_in_flight", "gRPC calls being served now", ["method"],
                               registry=self.registry)
        self._runner: web.AppRunner | None = None
        self.port = 0

    def observer(self, model: str, version: int):
        """A batch observer for the batcher of one model version."""
        v = str(version)
        queue, compute, size = (self.queue_time.labels(model, v), self.compute_time.labels(model, v),
                                self.batch_size.labels(model, v))
        requests, failures = self.requests.labels(model, v), self.failures.labels(model, v)

        def observe(units: int, queue_times: list[float], compute_s: float, failed: int) -> None:
            requests.inc(len(queue_times))
            if failed:
                failures.inc(failed)
            for t in queue_times:
                queue.observe(t)
            compute.observe(compute_s)
            size.observe(units)

        return observe

    async def serve(self, port: int, host: str = "127.0.0.1") -> None:
        """Serve /metrics on host:port (IPv6 addresses too); OSError if it cannot bind."""
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
        except OSError:
            await self.close()
            raise
        self.port = self._runner.addresses[0][1]

    async def _scrape(self, request: web.Request) -> web.Response:
        body = await asyncio.to_thread(generate_latest, self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
