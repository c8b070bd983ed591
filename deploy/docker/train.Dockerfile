# The training image: the train/export job (PyTorch, onnx, and the exporter's repository format). It writes a
# model repository into the volume mounted at /models, which the serving images then read.
#   docker build -f deploy/docker/train.Dockerfile -t cnn-serving:train .
#   docker run --rm -v models:/models -v /usr/share/datasets/fashion-mnist:/data:ro cnn-serving:train \
#       train --config configs/small_fmnist.yaml data_dir=/data out_dir=/models/runs/small_fmnist

FROM python:3.11-slim AS wheels
WORKDIR /src
COPY pyproject.toml README.md ./
COPY serving ./serving
COPY training ./training
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[train]"

FROM python:3.11-slim
RUN useradd --system --uid 10001 --create-home --shell /usr/sbin/nologin trainer
COPY --from=wheels /wheels /wheels
# The wheels built above, installed offline: their versions are the ones resolved there.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --no-index --find-links /wheels "cnn-serving[train]" && rm -rf /wheels
# The models volume is seeded from here when new: owned by this user so that export can write into it.
RUN mkdir /models && chown 10001:10001 /models
WORKDIR /home/trainer
COPY configs ./configs
ENV PYTHONDONTWRITEBYTECODE=1 MPLCONFIGDIR=/tmp/matplotlib
USER 10001
ENTRYPOINT ["python", "-m", "training"]
CMD ["--help"]
