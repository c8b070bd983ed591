"""ModelStatistics in Triton's terms, from the batcher's counters."""

from __future__ import annotations

from ....wire.inference import grpc_service_pb2 as pb
from ...model import ModelVersion


def model_statistics(mv: ModelVersion) -> pb.ModelStatistics:
    """Triton's statistics from the batcher's counters: `success` is each successful request's time from
    queueing to its answer; `compute_infer` counts executions (one per batch), as batch_stats do."""
    s = mv.batcher.stats
    failed = s.failures + s.expired + s.rejected
    d = pb.StatisticDuration
    stats = pb.InferStatistics(
        success=d(count=s.succeeded, ns=s.success_ns),
        fail=d(count=failed),
        queue=d(count=s.succeeded + s.failures, ns=s.queue_ns),
        compute_infer=d(count=s.executions, ns=s.compute_ns))
    batches = [pb.InferBatchStatistics(batch_size=size, compute_infer=d(count=n))
               for size, n in sorted(s.batch_sizes.items())]
    return pb.ModelStatistics(name=mv.name, version=str(mv.version), last_inference=s.last_inference_ms,
                              inference_count=s.units, execution_count=s.executions, inference_stats=stats,
                              batch_stats=batches)
