"""The inference server (the `[server]` extra): the model engine (`serving.engine`) behind a dynamic
batcher, answering classifier.v1 and KServe v2 over gRPC.

    app.py          server assembly: gRPC server, services, health, reflection, metrics, signals
    handlers.py     what runs around every call: counting, the caller's check, its trace span, the error's status
    access.py       tokens, roles, TLS files; drain.py: admission and the drain; connections.py: their bounds
    api/            the thin servicers (classifier.v1, KServe v2): wire messages <-> wire-level requests
    repository.py   discover, load by version policy, route, poll, hot swap, unload
    model.py        one served version: what the engine loaded, its batcher, its statistics; the error boundary
    batcher.py      the generic dynamic batcher: it schedules, and nothing else (no gRPC, onnxruntime or numpy)
    statistics.py   a version's counters (KServe ModelStatistics), fed by the batcher, feeding Prometheus
    metrics.py      Prometheus; tracing.py: OpenTelemetry spans; logs.py: text or JSON lines

Nothing is imported here, so that `serving.server.batcher` and the others load without the rest.
"""
