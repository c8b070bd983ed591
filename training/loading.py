"""The data of a run: the splits loaded on the host, then resident on the training device, and each process's
batches of an epoch gathered, converted and augmented there."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from . import data as datasets
from .augment import AugmentConfig, augment, to_model_input
from .config import TrainConfig
from .runtime import Runtime
from .schedule import shard_size


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


def epoch_batches(split: DeviceSplit, data: Data, cfg: TrainConfig, rt: Runtime, epoch: int,
                  gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This process's batches of one epoch. The permutation is seeded by the epoch, so every process draws the
    same one and takes every world-th image, and a resumed run sees the order it would have seen. It is copied
    to the device once per epoch, never per step."""
    order = np.random.default_rng(cfg.seed + epoch).permutation(len(split))[rt.rank::rt.world]
    order = torch.from_numpy(order[: shard_size(len(split), rt.world)].copy()).to(rt.device)
    for start in range(0, len(order), cfg.batch_size):
        yield model_batch(split, order[start:start + cfg.batch_size], data, cfg.augment, gen)
