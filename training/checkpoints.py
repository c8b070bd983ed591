"""Checkpoints: `checkpoint.pt` (the best-validation model, what export reads) and `last.pt` (model, optimiser,
learning-rate schedule and history, what `resume=true` continues from). State dicts and plain values only, on
the CPU, loaded with weights_only."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from .config import TrainConfig
from .models import create_model


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict on the CPU, so a checkpoint written on a GPU loads anywhere."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def save_best(path: Path, model: nn.Module, cfg: TrainConfig, model_args: dict, classes: list[str]) -> None:
    torch.save({"model": cpu_state(model), "model_name": cfg.model, "model_args": json.dumps(model_args),
                "classes": classes}, path)


def save_last(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: LRScheduler, epoch: int,
              history: list[dict]) -> None:
    torch.save({"model": cpu_state(model), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "epoch": epoch, "history": json.dumps(history)}, path)


def resume_from(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: LRScheduler,
                device: torch.device) -> tuple[int, list[dict]]:
    """Load `last.pt` into the model, the optimiser and the schedule: the epoch to start from and the history so
    far."""
    state = torch.load(path, map_location=device, weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if "scheduler" not in state:
        raise ValueError(f"{path} holds no learning-rate schedule (written by an older version): resume=false "
                         "starts the run afresh")
    scheduler.load_state_dict(state["scheduler"])
    return state["epoch"], json.loads(state["history"])


def load_checkpoint(path: str | Path) -> tuple[torch.nn.Module, list[str]]:
    """Rebuild a model from a checkpoint (state dict and plain values only, loaded with weights_only), on the CPU."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = create_model(state["model_name"], **json.loads(state["model_args"]))
    model.load_state_dict(state["model"])
    model.eval()
    return model, list(state["classes"])
