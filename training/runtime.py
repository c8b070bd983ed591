"""Where and how a training process runs: its rank among the processes (torchrun), its device and its precision."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import numpy as np
import torch

from .config import TrainConfig


def autocast_context(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` on the device, or nothing at all (plain fp32) when `dtype` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@dataclass
class Runtime:
    """Where this process trains and how: its rank among `world` processes, its device, its autocast dtype."""

    rank: int
    world: int
    device: torch.device
    amp_dtype: torch.dtype | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast_context(self.device, self.amp_dtype)

    def describe(self) -> str:
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "CPU"
        precision = {None: "fp32", torch.bfloat16: "bf16 autocast"}.get(self.amp_dtype, str(self.amp_dtype))
        return f"{self.world} process(es) on {self.device} ({name}), {precision}, torch {torch.__version__}"


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto` is CUDA when torch sees a GPU, else the CPU; under torchrun each process takes its local GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"device={name}, but this torch ({torch.__version__}) sees no GPU")
        return torch.device(name if ":" in name else f"cuda:{local_rank}")
    raise ValueError(f"unknown device {name!r}: auto, cpu, cuda or cuda:N")


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """bf16 on CUDA by default: tensor-core speed without fp16's loss scaling. The CPU stays fp32 unless asked:
    its bf16 autocast is correct, but without bf16 matrix instructions (AMX) it is several times slower."""
    if amp == "off":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    raise ValueError(f"unknown amp {amp!r}: auto, bf16 or off")


def world_size() -> int:
    """How many processes train together: torchrun's WORLD_SIZE, 1 when started alone."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup_runtime(cfg: TrainConfig) -> Runtime:
    """Join the process group under torchrun, pick the device and precision, seed everything."""
    rank, world = int(os.environ.get("RANK", "0")), world_size()
    device = resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    amp_dtype = autocast_dtype(cfg.amp, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # every batch has the same shape: pick the fastest kernels once
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    return Runtime(rank, world, device, amp_dtype)


def stop_everywhere(rt: Runtime, stop: bool) -> bool:
    """The main process decides to stop early; every process must stop with it, or DDP's next all-reduce hangs."""
    if rt.world == 1:
        return stop
    flag = torch.tensor([int(stop)], device=rt.device)
    torch.distributed.broadcast(flag, src=0)
    return bool(flag.item())
