"""The peer to beat: PyTriton (Triton's own dynamic batcher) serving the same ONNX file through onnxruntime.

Run with a Python that has `nvidia-pytriton` and `onnxruntime` (its own virtual environment; on CPU, with
LD_LIBRARY_PATH pointing at that Python's lib/ so the bundled tritonserver finds libpython):
    python bench/pytriton_server.py MODEL_DIR NAME GRPC_PORT MAX_BATCH [HTTP_PORT] [--same-outputs]
Prints `SERVING 127.0.0.1:PORT` (the gRPC port) when ready, like `python -m serving serve`; Triton's HTTP front
end listens on HTTP_PORT (a free port when not given).

By default the model has one output, `logits`. With --same-outputs it has the four the project's server lists
for this model (`logits`, `features`, `probabilities` and `cam`, the map of the predicted class, computed with
the project's own formula in serving/cam_maths.py): perf_analyzer asks for every output a model lists, so this is
the peer doing the same work per request, i.e. Triton plus a CAM script.
"""

import os
import socket
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # serving.cam_maths: numpy only
from serving.cam_maths import class_activation_maps  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    same_outputs = "--same-outputs" in sys.argv
    argv = [a for a in sys.argv if a != "--same-outputs"]
    model_dir, name, grpc_port, max_batch = argv[1], argv[2], int(argv[3]), int(argv[4])
    so = ort.SessionOptions()
    so.intra_op_num_threads = os.cpu_count() or 1
    session = ort.InferenceSession(os.path.join(model_dir, "1", "model.onnx"), so, providers=["CPUExecutionProvider"])
    shape = tuple(session.get_inputs()[0].shape[1:])
    classes = session.get_outputs()[0].shape[1]
    outputs = [Tensor(name="logits", dtype=np.float32, shape=(classes,))]

    @batch
    def logits_only(input: np.ndarray):  # noqa: A002 - the tensor's name on the wire
        return {"logits": session.run(["logits"], {"input": input})[0]}

    @batch
    def every_output(input: np.ndarray):  # noqa: A002
        logits, features = session.run(["logits", "features"], {"input": input})
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
        cam = class_activation_maps(features, cam_weights, probabilities.argmax(axis=1), shape[1:])
        return {"logits": logits, "features": features, "probabilities": probabilities, "cam": cam}

    if same_outputs:
        cam_weights = np.load(os.path.join(model_dir, "1", "cam_weights.npy")).astype(np.float32)
        outputs += [Tensor(name="features", dtype=np.float32, shape=tuple(session.get_outputs()[1].shape[1:])),
                    Tensor(name="probabilities", dtype=np.float32, shape=(classes,)),
                    Tensor(name="cam", dtype=np.float32, shape=shape[1:])]

    http_port = int(argv[5]) if len(argv) > 5 else free_port()
    config = TritonConfig(grpc_port=grpc_port, http_port=http_port, metrics_port=free_port())
    # No endpoint restricted to an access token: perf_analyzer reads the model's statistics and configuration,
    # which PyTriton otherwise keeps behind a token of its own (a local benchmark, on loopback).
    with Triton(config=config, security_config=TritonSecurityConfig(restricted_endpoints=[])) as triton:
        triton.bind(model_name=name, infer_func=every_output if same_outputs else logits_only,
                    inputs=[Tensor(name="input", dtype=np.float32, shape=shape)], outputs=outputs,
                    config=ModelConfig(max_batch_size=max_batch, batcher=DynamicBatcher(max_queue_delay_microseconds=0)))
        print(f"SERVING 127.0.0.1:{grpc_port}", flush=True)
        triton.serve()


if __name__ == "__main__":
    main()
