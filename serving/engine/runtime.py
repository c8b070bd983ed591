"""onnxruntime sessions for one model version: provider choice, thread budget, GPU I/O binding, warm-up.

`onnxruntime-gpu` lists CUDAExecutionProvider even where the CUDA libraries are missing and silently falls
back to CPU when the session is created, so the provider reported everywhere is the one the session
really got (`session.get_providers()[0]`), never the one asked for.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

log = logging.getLogger("serving.runtime")


@dataclass
class RuntimeOptions:
    device: str = "auto"             # auto | cpu | cuda
    tensorrt: bool = False           # try the TensorRT provider first (engine cache, FP16)
    trt_fp16: bool = True
    trt_cache_dir: str = ""
    intra_op_threads: int = 0        # 0 = cores / instances
    spin_wait: bool = False          # let idle intra-op threads spin (lower latency, but steals CPU from gRPC)
    cuda_device_id: int = 0
    cuda_graphs: bool = False        # CUDA provider: replay one captured CUDA graph per batch-size bucket


_preloaded = False
_fallback_reported: set[str] = set()  # providers whose fallback was logged (once per process)


def _preload_cuda_libraries() -> None:
    """Wheels of CUDA/cuDNN installed by pip (e.g. with torch) are found only when preloaded. Where they
    are missing, onnxruntime prints a screen of errors; the fallback is reported once, by us, instead."""
    global _preloaded
    preload = getattr(ort, "preload_dlls", None)
    if _preloaded or preload is None:
        return
    _preloaded = True
    ort.set_default_logger_severity(4)
    with _quiet_fds():
        try:
            preload()
        except Exception as e:  # noqa: BLE001 - a CPU machine has nothing to preload
            log.debug("preload_dlls: %s", e)


@contextlib.contextmanager
def _quiet_fds():
    """Silence native prints to stdout/stderr (C++ code bypasses Python's streams)."""
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def choose_providers(options: RuntimeOptions, instance: int = 0) -> list:
    available = ort.get_available_providers()
    providers: list = []
    if options.device in ("auto", "cuda") and "CUDAExecutionProvider" in available:
        if options.tensorrt and "TensorrtExecutionProvider" in available:
            trt = {"device_id": options.cuda_device_id, "trt_fp16_enable": options.trt_fp16,
                   "trt_engine_cache_enable": bool(options.trt_cache_dir)}
            if options.trt_cache_dir:
                trt["trt_engine_cache_path"] = options.trt_cache_dir
            providers.append(("TensorrtExecutionProvider", trt))
        cuda = {"device_id": options.cuda_device_id, "arena_extend_strategy": "kSameAsRequested"}
        if options.cuda_graphs and not options.tensorrt:  # graphs need every node on the CUDA provider
            cuda["enable_cuda_graph"] = "1"
        providers.append(("CUDAExecutionProvider", cuda))
    elif options.device == "cuda":
        raise RuntimeError(f"device=cuda asked, but onnxruntime offers only {available}")
    providers.append("CPUExecutionProvider")
    return providers


class OrtSessions:
    """`instances` sessions over one ONNX file; `run(x, outputs, instance)` is thread-safe per instance."""

    def __init__(self, path: Path, input_name: str, output_names: list[str], instances: int = 1,
                 options: RuntimeOptions | None = None):
        self.options = options or RuntimeOptions()
        self.input_name = input_name
        self.output_names = output_names
        cores = os.cpu_count() or 1
        threads = self.options.intra_op_threads or max(1, cores // max(1, instances))
        providers = choose_providers(self.options)
        if any((p[0] if isinstance(p, tuple) else p) != "CPUExecutionProvider" for p in providers):
            _preload_cuda_libraries()
        self.sessions = []
        for _ in range(max(1, instances)):
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            # Parallelism comes from intra-op threads and instances, not from running branches of these
            # sequential CNN graphs side by side.
            so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
            so.enable_cpu_mem_arena = True
            so.log_severity_level = 3
            if not self.options.spin_wait:
                # Spinning threads would compete for the same cores with the gRPC and event-loop threads.
                so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            if len(providers) > 1:
                with _quiet_fds():
                    self.sessions.append(ort.InferenceSession(str(path), sess_options=so, providers=providers))
            else:
                self.sessions.append(ort.InferenceSession(str(path), sess_options=so, providers=providers))
        self.provider = self.sessions[0].get_providers()[0]
        asked = providers[0][0] if isinstance(providers[0], tuple) else providers[0]
        if asked != self.provider and asked not in _fallback_reported:
            _fallback_reported.add(asked)
            # Once per process, not per version: the cause (no GPU, no CUDA libraries) is the machine's.
            log.warning("%s is not usable in this process (CUDA/cuDNN libraries missing or no GPU): every model "
                        "runs on %s", asked, self.provider)
        self.threads = threads
        self._use_binding = self.provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
        self._buckets: list[BucketedBinding] = []  # one per instance, with --cuda-graphs on the CUDA provider
        if self.options.cuda_graphs and not self.options.tensorrt and self.provider == "CUDAExecutionProvider":
            self._buckets = [BucketedBinding(s, input_name, "cuda", self.options.cuda_device_id)
                             for s in self.sessions]
        log.info("%s: %d instance(s) on %s, %d intra-op thread(s)%s", path, len(self.sessions), self.provider, threads,
                 ", CUDA graphs" if self._buckets else "")

    def run(self, x: np.ndarray, outputs: list[str], instance: int = 0) -> list[np.ndarray]:
        session = self.sessions[instance % len(self.sessions)]
        if self._buckets:
            return self._buckets[instance % len(self._buckets)].run(x, outputs)
        if not self._use_binding:
            return session.run(outputs, {self.input_name: x})
        # GPU: bind the host input once and fetch only the outputs asked for, avoiding ORT's extra copies.
        binding = session.io_binding()
        binding.bind_cpu_input(self.input_name, np.ascontiguousarray(x))
        for name in outputs:
            binding.bind_output(name, "cpu")
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def warm_up(self, input_shape: tuple[int, ...], max_batch_size: int) -> None:
        """Run each instance once per batch size it will meet, so the first requests pay no set-up cost
        (on the GPU every power of two; with CUDA graphs the buffers are made and each graph captured)."""
        for buckets in self._buckets:
            buckets.prepare(input_shape, max_batch_size, self.output_names)
        sizes = batch_buckets(max_batch_size) if self._use_binding else [1, max_batch_size]
        for i in range(len(self.sessions)):
            for n in sorted(set(sizes)):
                for _ in range(2 if self._buckets else 1):  # onnxruntime captures a graph on its second run
                    self.run(np.zeros((n, *input_shape), np.float32), self.output_names, i)


def batch_buckets(max_batch_size: int) -> list[int]:
    """The batch sizes a GPU session is warmed (and a CUDA graph captured) for: powers of two, and the max."""
    return sorted({2 ** i for i in range(max_batch_size.bit_length()) if 2 ** i <= max_batch_size} | {max_batch_size})


class BucketedBinding:
    """Runs a batch at the size of its bucket (the next power of two, or the max) through buffers allocated once
    per bucket on `device` and bound once, so that with CUDA graphs each run replays the graph captured for that
    size (annotated `gpu_graph_id`). Padding rows are computed and dropped: the models treat rows independently.
    On "cpu" the same logic runs without graphs, which is how it is tested without a GPU."""

    def __init__(self, session: ort.InferenceSession, input_name: str, device: str = "cuda", device_id: int = 0):
        self.session, self.input_name, self.device, self.device_id = session, input_name, device, device_id
        self.slots: dict[int, tuple] = {}  # bucket size -> (host staging array, input value, outputs, binding, options)

    def prepare(self, input_shape: tuple[int, ...], max_batch_size: int, output_names: list[str]) -> None:
        shapes = {o.name: o.shape[1:] for o in self.session.get_outputs() if o.name in output_names}
        if not all(isinstance(d, int) for shape in shapes.values() for d in shape):
            raise ValueError(f"CUDA graphs need fixed output shapes apart from the batch; the model gives {shapes}")
        value = ort.OrtValue.ortvalue_from_shape_and_type
        for graph_id, n in enumerate(batch_buckets(max_batch_size)):
            host = np.zeros((n, *input_shape), np.float32)
            x = value([n, *input_shape], np.float32, self.device, self.device_id)
            outputs = {name: value([n, *shape], np.float32, self.device, self.device_id) for name, shape in shapes.items()}
            binding = self.session.io_binding()
            binding.bind_ortvalue_input(self.input_name, x)
            for name, out in outputs.items():
                binding.bind_ortvalue_output(name, out)
            options = ort.RunOptions()
            options.add_run_config_entry("gpu_graph_id", str(graph_id))
            self.slots[n] = (host, x, outputs, binding, options)

    def run(self, x: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
        k = len(x)
        n = next((size for size in self.slots if size >= k), None)
        if n is None:
            # The batcher never forms a batch above max_batch_size, the largest bucket: this is a server bug.
            raise RuntimeError(f"batch of {k} is larger than the largest bucket ({max(self.slots, default=0)})")
        host, value, bound, binding, options = self.slots[n]
        host[:k] = x
        value.update_inplace(host)  # into the same device buffer the graph was captured with
        self.session.run_with_iobinding(binding, options)
        return [bound[name].numpy()[:k] for name in outputs]
