# The CPU serving image: the package's [server-cpu] extra (the CPU build of onnxruntime, grpcio, numpy, Pillow),
# no torch, no onnx, no training code, no CUDA libraries, no compilers. Build from the repository root:
#   docker build -f deploy/docker/server.Dockerfile -t cnn-serving:cpu .
# Mount a model repository read-only at /models (the bundled one is baked in); tokens and TLS files come in as
# mounted secrets (CNN_SERVING_AUTH_TOKEN_FILE, CNN_SERVING_TLS_CERT, ...: every serve flag has its variable).
# BASE is any Debian-based image whose `pip` and `python` are Python 3.11: the official slim image by default,
# scripts/containers/base.sh's local one where no registry can be reached.
ARG BASE=python:3.11-slim

FROM ${BASE} AS wheels
# A CA bundle for pip behind an intercepting proxy (mounted into the build); pip's own when empty.
ARG PIP_CERT
WORKDIR /src
COPY pyproject.toml README.md ./
COPY serving ./serving
# Wheels of the project and of every dependency, built here so that the final stage only installs them.
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[server-cpu]" \
    && sha256sum /wheels/*.whl > /wheels.sha256

FROM ${BASE}
# A fixed numeric user, so Kubernetes' runAsNonRoot can verify it.
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin serving
# The wheels' hashes, copied first: a build cache keys the RUN below on its text, not on what a mount holds,
# so without them an old layer (with the old code) would be reused after the source changed.
COPY --from=wheels /wheels.sha256 /tmp/wheels.sha256
# The wheels built above, mounted for this step only (a COPY would keep them in a layer), installed offline:
# their versions are the ones resolved there.
# hadolint ignore=DL3013
RUN --mount=type=bind,from=wheels,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels "cnn-serving[server-cpu]"
COPY --chmod=755 deploy/docker/grpc-health.sh /usr/local/bin/grpc-health
# Owned by the serving user, so that a named volume seeded from it can be written by the train image's export.
COPY --chown=10001:10001 model_repository /models
ENV CNN_SERVING_MODEL_REPOSITORY=/models \
    CNN_SERVING_HOST=0.0.0.0 \
    CNN_SERVING_PORT=8001 \
    CNN_SERVING_HTTP_PORT=8000 \
    CNN_SERVING_WORKERS=auto \
    CNN_SERVING_METRICS_PORT=9090 \
    CNN_SERVING_METRICS_HOST=0.0.0.0 \
    CNN_SERVING_DRAIN_DELAY=5 \
    CNN_SERVING_EXIT_TIMEOUT=30 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001
EXPOSE 8001 8000 9090
# The standard gRPC health service, asked by a shell script (no Python process per probe).
HEALTHCHECK --interval=10s --timeout=4s --start-period=30s --retries=3 CMD ["grpc-health"]
ENTRYPOINT ["python", "-m", "serving", "serve"]
