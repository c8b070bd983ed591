"""Prometheus metrics on an HTTP port: requests, failures, queue and compute time, batch sizes, in flight."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

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

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        start_http_server(port, addr=addr, registry=self.registry)
