"""The learning-rate schedules, built from torch's schedulers, give every step the rate of the formulas the loop
used before (written out here as the reference), for every schedule name the configs use."""

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from training.config import config_from_dict, load_config
from training.schedule import make_scheduler, peak_lr, steps_per_epoch


def reference_lr(cfg, peak: float, epoch_steps: int, step: int) -> float:
    """The rate at `step` as the hand-written schedule computed it."""
    total, warmup = epoch_steps * cfg.epochs, int(cfg.warmup_epochs * epoch_steps)
    if cfg.schedule == "onecycle":
        top = max(1, int(0.3 * total))
        if step < top:
            return peak * (0.04 + 0.96 * step / top)
        return peak * 0.5 * (1 + math.cos(math.pi * (step - top) / max(1, total - top)))
    if step < warmup:
        return peak * (step + 1) / warmup
    if cfg.schedule == "cosine":
        return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    if cfg.schedule == "step":
        return peak * cfg.step_gamma ** ((step // epoch_steps) // cfg.step_size)
    assert cfg.schedule == "constant"
    return peak


def rates(cfg, peak: float, epoch_steps: int) -> list[float]:
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=peak)
    scheduler = make_scheduler(cfg, optimizer, epoch_steps)
    seen = []
    for _ in range(epoch_steps * cfg.epochs):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


@pytest.mark.parametrize("schedule", ["cosine", "step", "onecycle", "constant"])
@pytest.mark.parametrize("warmup_epochs", [0, 0.5, 1, 2])
@pytest.mark.parametrize("epoch_steps", [1, 7, 53])
def test_every_step_has_the_reference_rate(schedule, warmup_epochs, epoch_steps):
    cfg = config_from_dict({"schedule": schedule, "warmup_epochs": warmup_epochs, "epochs": 12, "step_size": 3,
                            "step_gamma": 0.5, "lr": 0.4})
    peak = peak_lr(cfg, world=1)
    got = rates(cfg, peak, epoch_steps)
    want = [reference_lr(cfg, peak, epoch_steps, s) for s in range(epoch_steps * cfg.epochs)]
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)
    per_epoch = got[epoch_steps - 1::epoch_steps]  # what metrics.json records: each epoch's last step
    assert per_epoch == pytest.approx(want[epoch_steps - 1::epoch_steps], rel=1e-9, abs=1e-12)


def test_the_configs_schedules_keep_their_rates():
    configs = sorted(Path(__file__).resolve().parents[2].glob("configs/*.yaml"))
    assert configs
    for path in configs:
        cfg = load_config(str(path), [])
        got = rates(cfg, peak_lr(cfg, world=1), 5)
        assert got == pytest.approx([reference_lr(cfg, peak_lr(cfg, world=1), 5, s) for s in range(5 * cfg.epochs)],
                                    rel=1e-9, abs=1e-12), path.name


def test_resume_continues_the_schedule():
    cfg = config_from_dict({"schedule": "cosine", "warmup_epochs": 1, "epochs": 4, "lr": 0.1})
    whole = rates(cfg, 0.1, 10)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    first = make_scheduler(cfg, optimizer, 10)
    for _ in range(20):
        optimizer.step()
        first.step()
    state = first.state_dict()
    # As training.checkpoints.resume_from does it: the scheduler is made, then both states are loaded.
    resumed_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    resumed = make_scheduler(cfg, resumed_opt, 10)
    resumed_opt.load_state_dict(optimizer.state_dict())
    resumed.load_state_dict(state)
    later = []
    for _ in range(20):
        later.append(resumed_opt.param_groups[0]["lr"])
        resumed_opt.step()
        resumed.step()
    assert later == pytest.approx(whole[20:], rel=1e-9)


def test_linear_lr_scaling_with_warmup():
    cfg = config_from_dict({"lr": 0.1, "lr_scaling": "linear", "batch_size": 1024, "warmup_epochs": 2, "epochs": 10})
    assert peak_lr(cfg, world=1) == pytest.approx(0.4)  # 0.1 per 256 images, global batch 1024
    assert peak_lr(cfg, world=2) == pytest.approx(0.8)  # 2 processes: global batch 2048
    assert peak_lr(dataclasses.replace(cfg, lr_scaling="none"), world=2) == 0.1
    with pytest.raises(ValueError, match="lr_scaling"):
        peak_lr(dataclasses.replace(cfg, lr_scaling="sqrt"), world=1)
    assert steps_per_epoch(cfg, n_train=54000, world=1) == 53
    assert steps_per_epoch(cfg, n_train=54000, world=2) == 27
    seen = rates(cfg, peak_lr(cfg, world=1), 53)
    assert len(seen) == 530
    warmup = seen[:106]
    assert warmup[0] == pytest.approx(0.4 / 106) and warmup[-1] == pytest.approx(0.4)
    assert all(a < b for a, b in zip(warmup, warmup[1:]))
    decay = seen[106:]
    assert decay[0] == pytest.approx(0.4) and all(a >= b for a, b in zip(decay, decay[1:]))
    assert decay[-1] < 1e-4
