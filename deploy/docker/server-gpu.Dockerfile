# The GPU serving image: the [gpu] extra, onnxruntime-gpu 1.31.1 (built for CUDA 13 and cuDNN 9) with the
# matching nvidia-* wheels of CUDA 13 and cuDNN 9, so no CUDA base image is needed: the host's NVIDIA driver
# comes in through the NVIDIA container toolkit (`--gpus all`, or compose's GPU reservation).
#   docker build -f deploy/docker/server-gpu.Dockerfile -t cnn-serving:gpu .
# Mount a model repository read-only at /models (the bundled one is baked in); tokens and TLS files come in as
# mounted secrets (CNN_SERVING_AUTH_TOKEN_FILE, CNN_SERVING_TLS_CERT, ...: every serve flag has its variable).
# BASE: see server.Dockerfile.
ARG BASE=python:3.11-slim

FROM ${BASE} AS wheels
ARG PIP_CERT
WORKDIR /src
COPY pyproject.toml README.md ./
COPY serving ./serving
# Wheels of the project and of every dependency, built here so that the final stage only installs them.
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[gpu]" \
    && sha256sum /wheels/*.whl > /wheels.sha256

FROM ${BASE}
# A fixed numeric user, so Kubernetes' runAsNonRoot can verify it.
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin serving
# The wheels' hashes, copied first: a build cache keys the RUN below on its text, not on what a mount holds,
# so without them an old layer (with the old code) would be reused after the source changed.
COPY --from=wheels /wheels.sha256 /tmp/wheels.sha256
# The wheels built above, mounted for this step only (a COPY would keep the CUDA wheels, gigabytes, in a
# layer), installed offline: their versions are the ones resolved there.
# hadolint ignore=DL3013
RUN --mount=type=bind,from=wheels,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels "cnn-serving[gpu]"
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
    CNN_SERVING_DEVICE=cuda \
    PYTHONDONTWRITEBYTECODE=1
USER 10001
EXPOSE 8001 8000 9090
# The standard gRPC health service, asked by a shell script (no Python process per probe).
HEALTHCHECK --interval=10s --timeout=4s --start-period=30s --retries=3 CMD ["grpc-health"]
ENTRYPOINT ["python", "-m", "serving", "serve"]
