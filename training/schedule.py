"""The learning-rate schedule of a run, per optimiser step, built from torch's own schedulers.

`schedule` (configs/*.yaml): `cosine`, `step`, `onecycle` or `constant`; `warmup_epochs` of linear warm-up
first (the one-cycle schedule has its own). The peak is `lr`, scaled with the global batch when
`lr_scaling: linear` (Goyal et al., 2017).
"""

from __future__ import annotations

import math

import torch
from torch.optim import lr_scheduler

from .config import TrainConfig

ONECYCLE_RISE = 0.3  # the share of the run the one-cycle schedule rises for (Smith & Topin, 2017)
ONECYCLE_START = 0.04  # where it starts, as a share of the peak (torch's OneCycleLR: 1 / div_factor 25)


def peak_lr(cfg: TrainConfig, world: int) -> float:
    """The top of the schedule. With `lr_scaling: linear`, `lr` is the rate for a global batch of 256 images and
    grows in proportion to the global batch (batch_size x processes), Goyal et al.'s rule for large batches;
    its warm-up (`warmup_epochs`) keeps the first steps stable."""
    if cfg.lr_scaling == "none":
        return cfg.lr
    if cfg.lr_scaling == "linear":
        return cfg.lr * cfg.batch_size * world / 256
    raise ValueError(f"unknown lr_scaling {cfg.lr_scaling!r}: none or linear")


def shard_size(n: int, world: int) -> int:
    """Images each process trains on per epoch: equal shards (at most world - 1 images left out, different ones
    every epoch), so every process takes the same number of steps and DDP's all-reduces pair up."""
    return n // world


def steps_per_epoch(cfg: TrainConfig, n_train: int, world: int) -> int:
    return math.ceil(shard_size(n_train, world) / cfg.batch_size)


def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, epoch_steps: int) -> lr_scheduler.LRScheduler:
    """The scheduler of the run, stepped once after every optimiser step; the optimiser's `lr` is the peak.

    - cosine: linear warm-up, then cosine annealing to zero at the end of the run;
    - step: the rate times `step_gamma` every `step_size` epochs (counted from the start), after the warm-up;
    - onecycle: linear from 4% of the peak to the peak over the first 30% of the run, then cosine to zero;
    - constant: the peak after the warm-up.
    """
    total = epoch_steps * cfg.epochs
    warmup = int(cfg.warmup_epochs * epoch_steps)
    if cfg.schedule == "onecycle":
        top = max(1, int(ONECYCLE_RISE * total))
        rise = lr_scheduler.LinearLR(optimizer, ONECYCLE_START, 1.0, total_iters=top)
        fall = lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total - top))
        return lr_scheduler.SequentialLR(optimizer, [rise, fall], milestones=[top])
    if cfg.schedule == "step":
        decay = lr_scheduler.StepLR(optimizer, step_size=cfg.step_size * epoch_steps, gamma=cfg.step_gamma)
        if warmup <= 1:  # a warm-up of one step is at the peak already
            return decay
        return lr_scheduler.ChainedScheduler([_warmup(optimizer, warmup), decay])
    if cfg.schedule == "cosine":
        after = lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total - warmup))
    elif cfg.schedule == "constant":
        after = lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    else:
        raise ValueError(f"unknown schedule {cfg.schedule!r}")
    if warmup == 0:
        return after
    return lr_scheduler.SequentialLR(optimizer, [_warmup(optimizer, warmup), after], milestones=[warmup])


def _warmup(optimizer: torch.optim.Optimizer, steps: int) -> lr_scheduler.LinearLR:
    """Step i of `steps` at (i + 1) / steps of the peak: the peak itself on the warm-up's last step."""
    return lr_scheduler.LinearLR(optimizer, 1 / steps, 1.0, total_iters=max(1, steps - 1))
