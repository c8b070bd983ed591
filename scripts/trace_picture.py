"""`python scripts/trace_picture.py`: the trace of one batched call, drawn from what a real OTLP receiver got.

The real server (in this process, tracing on, a 20 ms queue delay so that callers share batches) exports to
an OTLP/gRPC receiver; eight callers, each inside a span of its own, classify at once. The picture shows
one caller's trace (its span, the server's call span, the queue wait, the batch with its phases) and the
other calls the batch served, reached by its links. Writes docs/images/trace_batched_call.png and prints
the spans as a table.
"""

from __future__ import annotations

import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

CALLERS = 8
OUT = ROOT / "docs" / "images" / "trace_batched_call.png"


def collect() -> tuple[list, dict]:
    import torch
    from opentelemetry.sdk.trace import TracerProvider

    from serving.client import ClassifierClient
    from serving.server.tracing import TraceConfig
    from tests.conftest import LABELS, running_server
    from tests.server.otlp_receiver import OtlpReceiver
    from training.export import export_to_repository
    from training.models import create_model

    repo = Path(tempfile.mkdtemp(prefix="trace-picture-"))
    torch.manual_seed(0)
    model = create_model("small_fmnist", in_channels=1, num_classes=10, input_size=(28, 28))
    export_to_repository(model, LABELS, repo, "fmnist", "small_fmnist", {"note": "random weights"}, 1)
    tracer = TracerProvider().get_tracer("caller")
    callers = {}
    with OtlpReceiver() as receiver:
        with running_server(repo, trace=TraceConfig(enabled=True, endpoint=receiver.endpoint),
                            batching_overrides={"max_queue_delay_us": 20_000}) as server:
            start = threading.Barrier(CALLERS)

            def one(i: int) -> None:
                with ClassifierClient(server.address) as client, tracer.start_as_current_span("caller") as span:
                    start.wait(10)
                    client.classify([np.full((28, 28), 16 * i, np.uint8)] * (1 + i % 3))
                ctx = span.get_span_context()
                callers[f"{ctx.trace_id:032x}"] = (span.start_time, span.end_time)

            threads = [threading.Thread(target=one, args=(i,)) for i in range(CALLERS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
    return receiver.spans, callers


def draw(spans: list, callers: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = [s for s in spans if s.name == "batch"]
    batch = max(batches, key=lambda b: len(b.links))
    (call,) = [s for s in spans if s.span_id == batch.parent_span_id]
    others = [s for s in spans if (s.trace_id, s.span_id) in batch.links and s.span_id != call.span_id]
    queue = next(s for s in spans if s.name == "queue" and s.parent_span_id == call.span_id)
    t0 = callers[call.trace_id][0]
    ms = lambda ns: (ns - t0) / 1e6  # noqa: E731
    rows = [("caller (client span)", *callers[call.trace_id], "#8da0cb"),
            (f"{call.name} (server)", call.start_ns, call.end_ns, "#66c2a5"),
            ("queue", queue.start_ns, queue.end_ns, "#fc8d62"),
            (f"batch: {batch.attributes['batch.size']} images, {len(batch.links)} calls", batch.start_ns,
             batch.end_ns, "#e78ac3")]
    at = batch.start_ns
    for phase in ("preprocess", "run", "postprocess"):
        end = at + int(batch.attributes[f"batch.{phase}.duration_s"] * 1e9)
        rows.append((f"  {phase}", at, max(end, at + 20_000), "#a6d854"))
        at = end
    for other in others:
        rows.append((f"linked call {other.span_id[:6]} (its own trace)", other.start_ns, other.end_ns, "#d9d9d9"))
    fig, ax = plt.subplots(figsize=(10, 0.42 * len(rows) + 1.2))
    for i, (_, start, end, color) in enumerate(rows):
        ax.barh(i, ms(end) - ms(start), left=ms(start), color=color, edgecolor="black", linewidth=0.4)
        ax.text(ms(end) + 0.2, i, f"{(end - start) / 1e6:.2f} ms", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=9)
    ax.invert_yaxis()
    ax.set_xlabel("ms since the caller's span began")
    ax.set_title("One batched Classify call: its trace, and the calls its batch span links to", fontsize=10)
    fig.tight_layout()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT, dpi=110)
    print(f"wrote {OUT.relative_to(ROOT)}")
    print("| span | start (ms) | duration (ms) |\n|---|---:|---:|")
    for label, start, end, _ in rows:
        print(f"| {label.strip()} | {ms(start):.2f} | {(end - start) / 1e6:.2f} |")


if __name__ == "__main__":
    draw(*collect())
