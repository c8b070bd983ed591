"""The training loop: reads top to bottom; its configuration is one dataclass (training/config.py).

Single process by default; under `torchrun --nproc_per_node N` it runs distributed data parallel (gloo on
CPU, nccl on GPU), each rank training on its own shard of every epoch.

The whole uint8 training set lives on the training device, and each batch is gathered, converted and
augmented there. On a GPU the forward and backward passes run under bf16 autocast in channels_last, and an
epoch reads nothing back to the host but the progress bar's figures every few steps. On the CPU the defaults
give the loop it always was (fp32, channels_last); `amp: bf16` is there too.

`train()` is the outline. Each of its sections is one function below it: the runtime (processes, device,
precision), the data, the model and optimiser, the schedule, one epoch, evaluation, checkpoints and the
final report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import data as datasets
from .augment import AugmentConfig, augment, to_model_input
from .config import TrainConfig, config_from_dict, load_config  # noqa: F401 - the loop's configuration, re-exported
from .models import create_model
from .plots import confusion_matrix, plot_confusion_matrix, plot_learning_curves

PROGRESS_EVERY = 20  # steps between progress-bar updates: each update waits for the device


# ---------------------------------------------------------------------------------------------------------
# The runtime: processes, device, precision


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


def setup_runtime(cfg: TrainConfig) -> Runtime:
    """Join the process group under torchrun, pick the device and precision, seed everything."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
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


# ---------------------------------------------------------------------------------------------------------
# The data: splits on the host, then resident on the device


@dataclass
class Data:
    """The splits as loaded (uint8 [N, H, W, C] numpy arrays) and the model input they become."""

    classes: list[str]
    channels: int
    size: tuple[int, int]
    train: datasets.Split
    val: datasets.Split
    test: datasets.Split | None


def load_data(cfg: TrainConfig) -> Data:
    ds = datasets.load_dataset(cfg.dataset, cfg.data_dir, cfg.download,
                               tuple(cfg.input_size or (28, 28)), cfg.channels or 1, cfg.verify_checksums)
    channels = cfg.channels or ds.train.images.shape[-1]
    size = tuple(cfg.input_size or ds.train.images.shape[1:3])
    train_split, val_split = datasets.train_val_split(ds.train, cfg.val_fraction, cfg.seed)
    if cfg.max_train_samples:
        train_split = datasets.Split(train_split.images[: cfg.max_train_samples], train_split.labels[: cfg.max_train_samples])
    return Data(ds.classes, channels, size, train_split, val_split, ds.test)


@dataclass
class DeviceSplit:
    """A split resident on the training device: uint8 pixels [N, H, W, C] (a quarter of float32's memory;
    Fashion-MNIST's training set is 42 MB) and int64 labels."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


def to_device(split: datasets.Split, device: torch.device) -> DeviceSplit:
    """One copy to the device for the whole run (on the CPU, no copy at all)."""
    return DeviceSplit(torch.from_numpy(split.images).to(device), torch.from_numpy(split.labels).to(device))


def model_batch(split: DeviceSplit, idx: torch.Tensor, data: Data, aug: AugmentConfig,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The training input and labels for these indices, made on the split's device: converted, augmented,
    channels_last."""
    x = to_model_input(split.images[idx], data.channels, data.size)
    if aug.active:
        x = augment(x, aug, gen)
    return x.contiguous(memory_format=torch.channels_last), split.labels[idx]


def shard_size(n: int, world: int) -> int:
    """Images each process trains on per epoch: equal shards (at most world - 1 images left out, different ones
    every epoch), so every process takes the same number of steps and DDP's all-reduces pair up."""
    return n // world


def epoch_batches(split: DeviceSplit, data: Data, cfg: TrainConfig, rt: Runtime, epoch: int,
                  gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This process's batches of one epoch. The permutation is seeded by the epoch, so every process draws the
    same one and takes every world-th image, and a resumed run sees the order it would have seen. It is copied
    to the device once per epoch, never per step."""
    order = np.random.default_rng(cfg.seed + epoch).permutation(len(split))[rt.rank::rt.world]
    order = torch.from_numpy(order[: shard_size(len(split), rt.world)].copy()).to(rt.device)
    for start in range(0, len(order), cfg.batch_size):
        yield model_batch(split, order[start:start + cfg.batch_size], data, cfg.augment, gen)


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
# The schedule


def peak_lr(cfg: TrainConfig, world: int) -> float:
    """The top of the schedule. With `lr_scaling: linear`, `lr` is the rate for a global batch of 256 images and
    grows in proportion to the global batch (batch_size x processes), Goyal et al.'s rule for large batches;
    its warm-up (`warmup_epochs`) keeps the first steps stable."""
    if cfg.lr_scaling == "none":
        return cfg.lr
    if cfg.lr_scaling == "linear":
        return cfg.lr * cfg.batch_size * world / 256
    raise ValueError(f"unknown lr_scaling {cfg.lr_scaling!r}: none or linear")


@dataclass(frozen=True)
class Schedule:
    """The run's optimiser steps and the learning rate at each: linear warm-up, then the chosen decay."""

    cfg: TrainConfig
    peak: float
    steps_per_epoch: int

    @property
    def total(self) -> int:
        return self.steps_per_epoch * self.cfg.epochs

    def lr_at(self, step: int) -> float:
        cfg, peak, total = self.cfg, self.peak, self.total
        warmup = int(cfg.warmup_epochs * self.steps_per_epoch)
        if cfg.schedule == "onecycle":  # up for 30%, cosine down to zero (Smith & Topin, 2017)
            top = max(1, int(0.3 * total))
            if step < top:
                return peak * (0.04 + 0.96 * step / top)
            return peak * 0.5 * (1 + math.cos(math.pi * (step - top) / max(1, total - top)))
        if step < warmup:
            return peak * (step + 1) / warmup
        if cfg.schedule == "cosine":
            return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
        if cfg.schedule == "step":
            return peak * cfg.step_gamma ** ((step // self.steps_per_epoch) // cfg.step_size)
        if cfg.schedule == "constant":
            return peak
        raise ValueError(f"unknown schedule {cfg.schedule!r}")


def make_schedule(cfg: TrainConfig, n_train: int, world: int) -> Schedule:
    return Schedule(cfg, peak_lr(cfg, world), math.ceil(shard_size(n_train, world) / cfg.batch_size))


# ---------------------------------------------------------------------------------------------------------
# One epoch, and evaluation


def train_one_epoch(cfg: TrainConfig, rt: Runtime, module: nn.Module, optimizer: torch.optim.Optimizer,
                    batches: Iterator[tuple[torch.Tensor, torch.Tensor]], schedule: Schedule,
                    epoch: int) -> tuple[float, float, int]:
    """One pass over this process's shard: its mean training loss and accuracy, and the images seen. The sums
    stay on the device (float64 for the loss, as Python floats were), read back once at the end."""
    module.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=rt.device)
    correct = torch.zeros((), dtype=torch.int64, device=rt.device)
    seen = 0
    show = cfg.progress and rt.is_main
    # disable=None: tqdm turns itself off when stderr is not a terminal, so a log gets the epoch lines, not
    # thousands of carriage-return updates.
    bar = tqdm(batches, total=schedule.steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
               disable=None if show else True, leave=False)
    for step, (x, y) in enumerate(bar):
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr_at(epoch * schedule.steps_per_epoch + step)
        with rt.autocast():
            logits = module(x)
        loss = loss_fn(cfg, logits.float(), y)  # the loss in fp32 whatever the autocast
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += len(y)
        loss_sum += loss.detach().double() * len(y)
        correct += (predictions(logits.detach()) == y).sum()
        if show and step % PROGRESS_EVERY == 0:
            bar.set_postfix(loss=f"{float(loss_sum) / seen:.4f}", acc=f"{100 * int(correct) / seen:.2f}%")
    return float(loss_sum) / seen, int(correct) / seen, seen


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
# Checkpoints


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict on the CPU, so a checkpoint written on a GPU loads anywhere."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def save_best(path: Path, model: nn.Module, cfg: TrainConfig, model_args: dict, classes: list[str]) -> None:
    torch.save({"model": cpu_state(model), "model_name": cfg.model, "model_args": json.dumps(model_args),
                "classes": classes}, path)


def save_last(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int,
              history: list[dict]) -> None:
    torch.save({"model": cpu_state(model), "optimizer": optimizer.state_dict(), "epoch": epoch,
                "history": json.dumps(history)}, path)


def resume_from(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                device: torch.device) -> tuple[int, list[dict]]:
    """Load `last.pt` into the model and the optimiser: the epoch to start from and the history so far."""
    state = torch.load(path, map_location=device, weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return state["epoch"], json.loads(state["history"])


def load_checkpoint(path: str | Path) -> tuple[torch.nn.Module, list[str]]:
    """Rebuild a model from a checkpoint (state dict and plain values only, loaded with weights_only), on the CPU."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = create_model(state["model_name"], **json.loads(state["model_args"]))
    model.load_state_dict(state["model"])
    model.eval()
    return model, list(state["classes"])


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
    schedule = make_schedule(cfg, len(data.train.labels), rt.world)
    optimizer = make_optimizer(cfg, model, schedule.peak)
    start_epoch, history = 0, []
    if cfg.resume and (out / "last.pt").exists():
        start_epoch, history = resume_from(out / "last.pt", model, optimizer, rt.device)
    module = training_module(cfg, model, rt)

    train_set = to_device(data.train, rt.device)
    val_set = to_device(data.val, rt.device) if rt.is_main else None
    gen = torch.Generator(device=rt.device).manual_seed(cfg.seed + 1000 * rt.rank)  # augmentation's randomness
    if rt.is_main:
        print(f"{cfg.model}: {sum(p.numel() for p in model.parameters()):,} parameters; {len(train_set)} train / "
              f"{len(data.val.labels)} val images; {rt.describe()}; global batch {cfg.batch_size * rt.world}, "
              f"peak lr {schedule.peak:g}")

    # Elapsed time carries over a resume, so train_time_s is the whole run's.
    started = time.time() - (history[-1]["elapsed_s"] if history else 0.0)
    best_acc = max((h["val_acc"] for h in history), default=-1.0)
    stale, stopped = 0, ""
    for epoch in range(start_epoch, cfg.epochs):
        epoch_started = time.time()
        batches = epoch_batches(train_set, data, cfg, rt, epoch, gen)
        train_loss, train_acc, seen = train_one_epoch(cfg, rt, module, optimizer, batches, schedule, epoch)
        images_per_s = seen * rt.world / (time.time() - epoch_started)
        if rt.is_main:
            val_loss, val_acc, _ = evaluate(model, val_set, data, cfg, rt.amp_dtype)
            record = {"epoch": epoch + 1, "train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss,
                      "val_acc": val_acc, "lr": optimizer.param_groups[0]["lr"],
                      "elapsed_s": round(time.time() - started, 1), "train_images_per_s": round(images_per_s)}
            history.append(record)
            print(f"epoch {epoch + 1}: train loss {train_loss:.4f} acc {100 * train_acc:.2f}% | val loss {val_loss:.4f} "
                  f"acc {100 * val_acc:.2f}% | {record['elapsed_s']}s, {record['train_images_per_s']:,} img/s", flush=True)
            if val_acc > best_acc:
                best_acc, stale = val_acc, 0
                save_best(out / "checkpoint.pt", model, cfg, model_args, data.classes)
            else:
                stale += 1
            save_last(out / "last.pt", model, optimizer, epoch + 1, history)
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
