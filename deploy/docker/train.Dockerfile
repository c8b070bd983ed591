# The training image: the train/export job (PyTorch, onnx, and the exporter's repository format). It writes a
# model repository into the volume mounted at /models, which the serving images then read.
#   docker build -f deploy/docker/train.Dockerfile -t cnn-serving:train .
#   docker run --rm -v models:/models -v runs:/runs -v /usr/share/datasets/fashion-mnist:/data:ro cnn-serving:train \
#       train --config configs/small_fmnist.yaml data_dir=/data out_dir=/runs/small_fmnist
# CPU torch (and the CPU onnxruntime) by default. The GPU variant takes PyPI's CUDA build of torch and
# onnxruntime-gpu:
#   docker build -f deploy/docker/train.Dockerfile -t cnn-serving:train-gpu \
#       --build-arg TORCH=torch==2.13.0 --build-arg TORCH_INDEX= --build-arg EXTRA=train .
# BASE: see server.Dockerfile.
ARG BASE=python:3.11-slim

FROM ${BASE} AS wheels
ARG PIP_CERT
# PyPI's torch for Linux is the multi-GB CUDA build: the CPU image takes PyTorch's CPU build from its index (or
# from a local wheelhouse: TORCH_INDEX="--find-links /path", mounted into the build).
ARG TORCH=torch==2.13.0+cpu
ARG TORCH_INDEX="--extra-index-url https://download.pytorch.org/whl/cpu"
ARG EXTRA=train-cpu
WORKDIR /src
COPY pyproject.toml README.md ./
COPY serving ./serving
COPY training ./training
# TORCH_INDEX holds options, split by the shell on purpose.
# hadolint ignore=SC2086
RUN pip wheel --no-cache-dir --wheel-dir /wheels $TORCH_INDEX "$TORCH" ".[$EXTRA]" \
    && sha256sum /wheels/*.whl > /wheels.sha256

FROM ${BASE}
ARG EXTRA=train-cpu
RUN useradd --system --uid 10001 --create-home --shell /usr/sbin/nologin trainer
# The wheels' hashes, copied first: a build cache keys the RUN below on its text, not on what a mount holds,
# so without them an old layer (with the old code) would be reused after the source changed.
COPY --from=wheels /wheels.sha256 /tmp/wheels.sha256
# The wheels built above, mounted for this step only (a COPY would keep them in a layer), installed offline.
# hadolint ignore=DL3013
RUN --mount=type=bind,from=wheels,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels "cnn-serving[$EXTRA]"
# The volumes are seeded from here when new: owned by this user so that train and export can write into them.
RUN mkdir /models /runs && chown 10001:10001 /models /runs
WORKDIR /home/trainer
COPY configs ./configs
ENV PYTHONDONTWRITEBYTECODE=1 MPLCONFIGDIR=/tmp/matplotlib
USER 10001
ENTRYPOINT ["python", "-m", "training"]
CMD ["--help"]
