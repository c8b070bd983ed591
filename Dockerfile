# The serving image: the package's [server] extra (onnxruntime, grpcio, numpy, Pillow); no torch, no onnx,
# and no training code.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY serving ./serving
RUN pip install --no-cache-dir ".[server]"
COPY model_repository ./model_repository
EXPOSE 8001 9090
# Health: the standard grpc.health.v1 service on the gRPC port.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s CMD python -c "import grpc, sys; \
from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; \
s = g.HealthStub(grpc.insecure_channel('127.0.0.1:8001')).Check(h.HealthCheckRequest(), timeout=2); \
sys.exit(s.status != h.HealthCheckResponse.SERVING)"
ENTRYPOINT ["python", "-m", "serving", "serve", "--host", "0.0.0.0", "--port", "8001", "--metrics-port", "9090", \
            "--model-repository", "/app/model_repository"]
