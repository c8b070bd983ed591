"""A model version's statistics, in one place: the batcher tells what happened and keeps no counters; this
module keeps Triton's counters (which KServe's ModelStatistics reports) and hands every event on to the
version's Prometheus series, so both read the same events.

Per successful request (Triton's inference_stats): its time from submit to answer, its time queued, and the
compute phases of the batch(es) it ran in, so that for every request queue + phases <= success. Per
execution (Triton's batch_stats): the phases of each batch, by its size in units.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class PhaseTotals:
    """Summed durations of the three compute phases, in ns (Triton's compute_input/infer/output)."""
    count: int = 0
    input_ns: int = 0
    infer_ns: int = 0
    output_ns: int = 0

    def add(self, phases: tuple[float, float, float], scale: float = 1.0) -> None:
        self.count += 1
        self.input_ns += int(phases[0] * scale * 1e9)
        self.infer_ns += int(phases[1] * scale * 1e9)
        self.output_ns += int(phases[2] * scale * 1e9)


class SeriesSink(Protocol):
    """Where each event goes on (the version's Prometheus series: `metrics.VersionMetrics`)."""

    def batch(self, units: int, queue_times: list[float], compute_s: float, errors: list[BaseException]) -> None: ...

    def request(self, total_s: float, queue_s: float, phases: tuple[float, float, float]) -> None: ...


@dataclass
class VersionStatistics:
    """The batcher's observer for one model version (see `batcher.BatchObserver`)."""
    succeeded: int = 0
    success_ns: int = 0     # submit to answer, summed over the requests that succeeded
    queue_ns: int = 0       # summed over the requests that succeeded
    compute: PhaseTotals = field(default_factory=PhaseTotals)  # per successful request
    executions: int = 0
    units: int = 0
    failures: int = 0
    rejected: int = 0       # refused at once: the queue was full
    expired: int = 0        # their deadline passed while queued
    batches: dict[int, PhaseTotals] = field(default_factory=dict)  # batch size -> its executions
    last_inference_ms: int = 0
    series: SeriesSink | None = None

    def queue_full(self) -> None:
        self.rejected += 1

    def deadline_passed(self) -> None:
        self.expired += 1

    def batch(self, units: int, queue_times: list[float], compute_s: float, phases: tuple[float, float, float],
              errors: list[BaseException]) -> None:
        self.failures += len(errors)
        self.executions += 1
        self.units += units
        self.batches.setdefault(units, PhaseTotals()).add(phases)
        self.last_inference_ms = int(time.time() * 1000)
        if self.series is not None:
            self.series.batch(units, queue_times, compute_s, errors)

    def request(self, total_s: float, queue_s: float, phases: tuple[float, float, float]) -> None:
        """One request answered successfully. A request split into chunks is told once, with the sum of its
        chunks' phases: scaled down where chunks ran side by side on several instances, so that queue +
        compute never exceeds the request's own time."""
        compute = sum(phases)
        scale = min(1.0, max(0.0, total_s - queue_s) / compute) if compute > 0 else 1.0
        self.succeeded += 1
        self.success_ns += int(total_s * 1e9)
        self.queue_ns += int(queue_s * 1e9)
        self.compute.add(phases, scale)
        if self.series is not None:
            self.series.request(total_s, queue_s, (phases[0] * scale, phases[1] * scale, phases[2] * scale))
