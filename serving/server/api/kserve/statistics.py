"""ModelStatistics in Triton's terms, from a version's counters (`server/statistics.py`).

`inference_stats` counts once per successful request for each of success, queue, compute_input,
compute_infer and compute_output (a request's compute phases are those of the batch it ran in), so the
counts are equal and, per request, queue + compute <= success. `batch_stats` counts executions per batch
size, each with its own three phases; their counts add up to `execution_count`. perf_analyzer checks both.
"""

from __future__ import annotations

from ....wire.inference import grpc_service_pb2 as pb
from ...model import ModelVersion
from ...statistics import PhaseTotals


def _phases(totals: PhaseTotals) -> dict[str, pb.StatisticDuration]:
    d = pb.StatisticDuration
    return {"compute_input": d(count=totals.count, ns=totals.input_ns),
            "compute_infer": d(count=totals.count, ns=totals.infer_ns),
            "compute_output": d(count=totals.count, ns=totals.output_ns)}


def model_statistics(mv: ModelVersion) -> pb.ModelStatistics:
    s = mv.stats
    d = pb.StatisticDuration
    stats = pb.InferStatistics(success=d(count=s.succeeded, ns=s.success_ns),
                               fail=d(count=s.failures + s.expired + s.rejected),
                               queue=d(count=s.succeeded, ns=s.queue_ns), **_phases(s.compute))
    batches = [pb.InferBatchStatistics(batch_size=size, **_phases(totals)) for size, totals in sorted(s.batches.items())]
    return pb.ModelStatistics(name=mv.name, version=str(mv.version), last_inference=s.last_inference_ms,
                              inference_count=s.units, execution_count=s.executions, inference_stats=stats,
                              batch_stats=batches)
