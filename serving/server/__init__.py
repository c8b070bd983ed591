"""The inference server (the `[server]` extra): onnxruntime behind a dynamic batcher, answering
classifier.v1 and KServe v2 over gRPC.

    app.py          server assembly: gRPC server, services, health, reflection, metrics, signals
    repository.py   discover, load by version policy, route, poll, hot swap, unload
    model.py        one loaded version: sessions, batch execution and its batcher; the error boundary
    execution.py    one batch: decode -> one onnxruntime run -> probabilities and ranking -> CAM
    batcher.py      the generic dynamic batcher (no gRPC, no onnxruntime inside)
    runtime.py      onnxruntime sessions: providers, threads, IOBinding and CUDA graphs on GPU, warm-up
    inference.py    the typed request and result passed between them
    preprocess.py   decode, resize, scale; cam.py: CAM maths and overlay PNGs
    errors.py       every error raised on purpose; api/status.py maps them to gRPC codes
    handlers.py     what runs around every call: counting, the caller's check, its trace span
    metrics.py      Prometheus; tracing.py: OpenTelemetry spans; logs.py: text or JSON lines
    api/            the thin servicers (classifier.v1, KServe v2) and streams answered in order

Nothing is imported here, so that `serving.server.batcher` and the others load without the rest.
"""
