"""The model engine: what runs a model version, for the server and for the Ray engine of batch jobs alike.

    inference.py    the typed request (wire-level images: encoded bytes, or tensors as bytes with dtype, shape
                    and layout) and result
    errors.py       every error raised on purpose, each naming its status
    decode.py       the one decode path: every image form into the batch buffer (one dtype table, one scaling)
    cam.py          CAM maths and overlay PNGs
    runtime.py      onnxruntime sessions: providers, threads, IOBinding and CUDA graphs on GPU, warm-up
    execution.py    one batch: decode -> one onnxruntime run -> probabilities and ranking -> CAM
    loading.py      one version from the repository into sessions and an execution; which model is meant

It imports no role: no server, client, job or training module, and no gRPC (`.importlinter`). Nothing is
imported here, so that `serving.engine.inference` loads without onnxruntime.
"""
