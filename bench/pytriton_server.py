"""The peer to beat: PyTriton (Triton's own dynamic batcher) serving the same ONNX file through onnxruntime.

Run with a Python that has `nvidia-pytriton` and `onnxruntime` (its own virtual environment; on CPU, with
LD_LIBRARY_PATH pointing at that Python's lib/ so the bundled tritonserver finds libpython):
    python bench/pytriton_server.py MODEL_DIR NAME GRPC_PORT MAX_BATCH [HTTP_PORT]
Prints `SERVING 127.0.0.1:PORT` (the gRPC port) when ready, like `python -m serving serve`; Triton's HTTP front
end listens on HTTP_PORT (a free port when not given).
"""

import os
import socket
import sys

import numpy as np
import onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    model_dir, name, grpc_port, max_batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    so = ort.SessionOptions()
    so.intra_op_num_threads = os.cpu_count() or 1
    session = ort.InferenceSession(os.path.join(model_dir, "1", "model.onnx"), so, providers=["CPUExecutionProvider"])
    shape = tuple(session.get_inputs()[0].shape[1:])
    classes = session.get_outputs()[0].shape[1]

    @batch
    def infer(input: np.ndarray):  # noqa: A002 - the tensor's name on the wire
        return {"logits": session.run(["logits"], {"input": input})[0]}

    http_port = int(sys.argv[5]) if len(sys.argv) > 5 else free_port()
    config = TritonConfig(grpc_port=grpc_port, http_port=http_port, metrics_port=free_port())
    # No endpoint restricted to an access token: perf_analyzer reads the model's statistics and configuration,
    # which PyTriton otherwise keeps behind a token of its own (a local benchmark, on loopback).
    with Triton(config=config, security_config=TritonSecurityConfig(restricted_endpoints=[])) as triton:
        triton.bind(model_name=name, infer_func=infer,
                    inputs=[Tensor(name="input", dtype=np.float32, shape=shape)],
                    outputs=[Tensor(name="logits", dtype=np.float32, shape=(classes,))],
                    config=ModelConfig(max_batch_size=max_batch, batcher=DynamicBatcher(max_queue_delay_microseconds=0)))
        print(f"SERVING 127.0.0.1:{grpc_port}", flush=True)
        triton.serve()


if __name__ == "__main__":
    main()
