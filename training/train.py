"""The training loop: reads top to bottom; its configuration is one dataclass (training/config.py).

Single process by default; under `torchrun --nproc_per_node N` it runs distributed data parallel (gloo on
CPU, nccl on GPU), each rank training on its own shard of every epoch.

The whole uint8 training set lives on the training device, and each batch is gathered, converted and
augmented there. On a GPU the forward and backward passes run under bf16 autocast in channels_last, and an
epoch reads nothing back to the host but the progress bar's figures every few steps. On the CPU the defaults
give the loop it always was (fp32, channels_last); `amp: bf16` is there too.

`train()` is the outline. Each of its sections is a function, here or in the module of its seam: the runtime
(processes, device, precision: runtime.py), the data (loading.py), the model and optimiser, the learning-rate
schedule (schedule.py, torch's schedulers), one epoch, evaluation, checkpoints (checkpoints.py) and the final
report.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LRScheduler
from tqdm import tqdm

from . import data as datasets
from .augment import to_model_input
from .checkpoints import load_checkpoint, resume_from, save_best, save_last
from .config import TrainConfig
from .loading import Data, DeviceSplit, epoch_batches, load_data, to_device
from .models import create_model
from .plots import confusion_matrix, plot_confusion_matrix, plot_learning_curves
from .runtime import Runtime, autocast_context, setup_runtime, stop_everywhere
from .schedule import make_scheduler, peak_lr, steps_per_epoch

PROGRESS_EVERY = 20  # steps between progress-bar updates: each update waits for the device


# ---------------------------------------------------------------------------------------------------------
# The model and the optimiser


def input_normalisation(train: datasets.Split, channels: int, size: tuple[int, int]) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of (up to 10,000) training images: the model stores them in its graph."""
    sample = to_model_input(train.images[:10000], channels, size)
    return sample.mean(dim=(0, 2, 3)).tolist(), sample.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()


def build_model(cfg: TrainConfig, data: Data, device: torch.device) -> tuple[nn.Module, dict]:
    """The registry's model on the device, and the arguments that rebuild it from a checkpoint."""
    mean, std = input_normalisation(data.train, data.channels, data.size)
    model_args = {"in_channels": data.channels, "num_classes": len(data.classes), "input_size": data.size,
                  "mean": mean, "std": std, **cfg.model_args}
    model = create_model(cfg.model, **model_args)
    # channels_last makes CPU convolutions about 25% faster here and is the layout GPU tensor cores take;
    # the exported graph is unaffected.
    return model.to(device=device, memory_format=torch.channels_last), model_args


def make_optimizer(cfg: TrainConfig, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    # No weight decay on biases and norm parameters: decaying them only hurts.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def training_module(cfg: TrainConfig, model: nn.Module, rt: Runtime) -> nn.Module:
    """What the loop calls: the model, wrapped in DDP across processes, compiled when asked for. Evaluation and
    checkpoints use the plain model, which shares its parameters."""
    module = model
    if rt.world > 1:
        device_ids = [rt.device.index] if rt.device.type == "cuda" else None
        module = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if cfg.compile:
        module = torch.compile(module, backend=cfg.compile_backend)
    return module


def loss_fn(cfg: TrainConfig, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if cfg.loss == "cross_entropy":
        return F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
    if cfg.loss == "quadratic":
        # Sum of squared differences between the (sigmoid or softmax) output and the one-hot target.
        probs = torch.sigmoid(logits) if logits.shape[1] == 1 else logits.softmax(1)
        target = F.one_hot(labels, probs.shape[1]).float() if probs.shape[1] > 1 else labels[:, None].float()
        return ((probs - target) ** 2).sum(1).mean()
    raise ValueError(f"unknown loss {cfg.loss!r}")


def predictions(logits: torch.Tensor) -> torch.Tensor:
    """Class indices, on the logits' device."""
    if logits.shape[1] == 1:  # binary linear classifier: one sigmoid output
        return (logits[:, 0] > 0).long()
    return logits.argmax(1)


# ---------------------------------------------------------------------------------------------------------
# One epoch, and evaluation


def train_one_epoch(cfg: TrainConfig, rt: Runtime, module: nn.Module, optimizer: torch.optim.Optimizer,
                    batches: Iterator[tuple[torch.Tensor, torch.Tensor]], scheduler: LRScheduler,
                    epoch_steps: int, epoch: int) -> tuple[float, float, int, float]:
    """One pass over this process's shard: its mean training loss and accuracy, the images seen and the learning
    rate of its last step. The sums stay on the device (float64 for the loss, as Python floats were), read back
    once at the end."""
    module.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=rt.device)
    correct = torch.zeros((), dtype=torch.int64, device=rt.device)
    seen = 0
    show = cfg.progress and rt.is_main
    # disable=None: tqdm turns itself off when stderr is not a terminal, so a log gets the epoch lines, not
    # thousands of carriage-return updates.
    lr = optimizer.param_groups[0]["lr"]
    bar = tqdm(batches, total=epoch_steps, desc=f"epoch {epoch + 1}/{cfg.epochs}",
               disable=None if show else True, leave=False)
    for step, (x, y) in enumerate(bar):
        lr = optimizer.param_groups[0]["lr"]
        with rt.autocast():
            logits = module(x)
        loss = loss_fn(cfg, logits.float(), y)  # the loss in fp32 whatever the autocast
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        seen += len(y)
        loss_sum += loss.detach().double() * len(y)
        correct += (predictions(logits.detach()) == y).sum()
        if show and step % PROGRESS_EVERY == 0:
            bar.set_postfix(loss=f"{float(loss_sum) / seen:.4f}", acc=f"{100 * int(correct) / seen:.2f}%")
    return float(loss_sum) / seen, int(correct) / seen, seen, lr


@torch.no_grad()
def evaluate(model: nn.Module, split: DeviceSplit, data: Data, cfg: TrainConfig,
             amp_dtype: torch.dtype | None = None) -> tuple[float, float, np.ndarray]:
    """Mean loss, accuracy and the predictions over a split, computed on the split's device; one read back."""
    model.eval()
    device = split.labels.device
    preds, total_loss = [], torch.zeros((), dtype=torch.float64, device=device)
    for i in range(0, len(split), cfg.eval_batch_size):
        x = to_model_input(split.images[i:i + cfg.eval_batch_size], data.channels, data.size)
        y = split.labels[i:i + cfg.eval_batch_size]
        with autocast_context(device, amp_dtype):
            logits = model(x)
        total_loss += loss_fn(cfg, logits.float(), y).double() * len(y)
        preds.append(predictions(logits))
    predicted = torch.cat(preds).cpu().numpy()
    return float(total_loss) / len(split), float((predicted == split.labels.cpu().numpy()).mean()), predicted


# ---------------------------------------------------------------------------------------------------------
# The report


def stop_reason(cfg: TrainConfig, stale: int, elapsed_s: float) -> str:
    """Why to stop before the last epoch, or '' to go on."""
    if cfg.early_stopping and stale >= cfg.early_stopping:
        return f"no better validation accuracy for {stale} epochs"
    if cfg.time_limit_s and elapsed_s >= cfg.time_limit_s:
        return f"time limit of {cfg.time_limit_s:g} s reached"
    return ""


def final_report(cfg: TrainConfig, rt: Runtime, data: Data, history: list[dict], stopped: str) -> dict:
    """metrics.json, config.json and the confusion matrix. The test split is touched once, for this report, with
    the best-validation checkpoint, in fp32: the accuracy the exported ONNX model will have."""
    out = Path(cfg.out_dir)
    model, _ = load_checkpoint(out / "checkpoint.pt")
    model = model.to(rt.device)
    global_batch = cfg.batch_size * rt.world
    metrics = {"model": cfg.model, "parameters": sum(p.numel() for p in model.parameters()),
               "best_val_acc": max((h["val_acc"] for h in history), default=-1.0), "epochs_run": len(history),
               "train_time_s": history[-1]["elapsed_s"] if history else 0.0,
               "setup": {"runtime": rt.describe(), "global_batch_size": global_batch,
                         "peak_lr": peak_lr(cfg, rt.world), "compile": cfg.compile},
               "history": history}
    if stopped:
        metrics["stopped_early"] = stopped
    if data.test is not None:
        test_loss, test_acc, preds = evaluate(model, to_device(data.test, rt.device), data, cfg)
        cm = confusion_matrix(data.test.labels, preds, len(data.classes))
        plot_confusion_matrix(cm, data.classes, out / "confusion_matrix.png", f"{cfg.model} test")
        metrics.update(test_loss=test_loss, test_acc=test_acc, confusion_matrix=cm.tolist())
        print(f"test accuracy {100 * test_acc:.2f}% ({len(preds)} images)")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    return metrics


# ---------------------------------------------------------------------------------------------------------
# The run


def train(cfg: TrainConfig) -> dict:
    rt = setup_runtime(cfg)
    out = Path(cfg.out_dir)
    if rt.is_main:
        out.mkdir(parents=True, exist_ok=True)

    data = load_data(cfg)
    model, model_args = build_model(cfg, data, rt.device)
    epoch_steps, peak = steps_per_epoch(cfg, len(data.train.labels), rt.world), peak_lr(cfg, rt.world)
    optimizer = make_optimizer(cfg, model, peak)
    scheduler = make_scheduler(cfg, optimizer, epoch_steps)
    start_epoch, history = 0, []
    if cfg.resume and (out / "last.pt").exists():
        start_epoch, history = resume_from(out / "last.pt", model, optimizer, scheduler, rt.device)
    module = training_module(cfg, model, rt)

    train_set = to_device(data.train, rt.device)
    val_set = to_device(data.val, rt.device) if rt.is_main else None
    gen = torch.Generator(device=rt.device).manual_seed(cfg.seed + 1000 * rt.rank)  # augmentation's randomness
    if rt.is_main:
        print(f"{cfg.model}: {sum(p.numel() for p in model.parameters()):,} parameters; {len(train_set)} train / "
              f"{len(data.val.labels)} val images; {rt.describe()}; global batch {cfg.batch_size * rt.world}, "
              f"peak lr {peak:g}")

    # Elapsed time carries over a resume, so train_time_s is the whole run's.
    started = time.time() - (history[-1]["elapsed_s"] if history else 0.0)
    best_acc = max((h["val_acc"] for h in history), default=-1.0)
    stale, stopped = 0, ""
    for epoch in range(start_epoch, cfg.epochs):
        epoch_started = time.time()
        batches = epoch_batches(train_set, data, cfg, rt, epoch, gen)
        train_loss, train_acc, seen, lr = train_one_epoch(cfg, rt, module, optimizer, batches, scheduler,
                                                          epoch_steps, epoch)
        images_per_s = seen * rt.world / (time.time() - epoch_started)
        if rt.is_main:
            val_loss, val_acc, _ = evaluate(model, val_set, data, cfg, rt.amp_dtype)
            record = {"epoch": epoch + 1, "train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss,
                      "val_acc": val_acc, "lr": lr,
                      "elapsed_s": round(time.time() - started, 1), "train_images_per_s": round(images_per_s)}
            history.append(record)
            print(f"epoch {epoch + 1}: train loss {train_loss:.4f} acc {100 * train_acc:.2f}% | val loss {val_loss:.4f} "
                  f"acc {100 * val_acc:.2f}% | {record['elapsed_s']}s, {record['train_images_per_s']:,} img/s", flush=True)
            if val_acc > best_acc:
                best_acc, stale = val_acc, 0
                save_best(out / "checkpoint.pt", model, cfg, model_args, data.classes)
            else:
                stale += 1
            save_last(out / "last.pt", model, optimizer, scheduler, epoch + 1, history)
            plot_learning_curves(history, out / "learning_curves.png", cfg.model)
            stopped = stop_reason(cfg, stale, time.time() - started) if epoch + 1 < cfg.epochs else ""
        if stop_everywhere(rt, bool(stopped)):
            if stopped:
                print(f"early stop: {stopped}")
            break

    if rt.world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if not rt.is_main:
        return {}
    return final_report(cfg, rt, data, history, stopped)
