"""The training loop's device path, precision, compile option, learning-rate rule and resume, on the CPU at toy
size (the same code runs on a GPU, where only the device differs)."""


import numpy as np
import pytest
import torch

from training.augment import AugmentConfig, augment, to_model_input
from training.checkpoints import load_checkpoint
from training.config import config_from_dict
from training.data import Split
from training.loading import Data, epoch_batches, model_batch, to_device
from training.runtime import Runtime, autocast_dtype, resolve_device
from training.train import train

CPU = torch.device("cpu")
ALL_AUGMENTATIONS = {"crop_padding": 2, "hflip": True, "translate": 0.1, "rotate": 10, "erasing": 0.5}


def toy_split(n: int = 64) -> tuple[Split, Data]:
    """Random pixels whose labels are their own indices, so a batch's labels say which images it holds."""
    images = np.random.default_rng(0).integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
    split = Split(images, np.arange(n, dtype=np.int64))
    return split, Data([str(i) for i in range(10)], 1, (28, 28), split, split, None)


def toy_config(data_dir, out_dir, **overrides) -> dict:
    return {"model": "small_fmnist", "dataset": "mnist", "data_dir": str(data_dir), "verify_checksums": False,
            "epochs": 3, "batch_size": 32, "lr": 0.05, "warmup_epochs": 0, "out_dir": str(out_dir),
            "model_args": {"widths": [8, 8, 8, 8]}, "progress": False, "threads": 1, **overrides}


def test_device_batch_equals_the_host_pipeline():
    """Resident uint8 pixels gathered, converted and augmented on the device give exactly what converting a numpy
    batch on the host gave, for the same indices and seed."""
    split, data = toy_split()
    aug = AugmentConfig(**ALL_AUGMENTATIONS)
    idx = np.array([5, 3, 60, 0, 7, 7, 31])
    expected = augment(to_model_input(split.images[idx], 1, (28, 28)), aug, torch.Generator().manual_seed(1))
    x, y = model_batch(to_device(split, CPU), torch.from_numpy(idx), data, aug, torch.Generator().manual_seed(1))
    assert x.shape == (7, 1, 28, 28) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x, expected, rtol=0, atol=0)
    assert y.tolist() == idx.tolist()


def test_data_path_makes_every_tensor_on_the_batch_device():
    """On a GPU, a tensor created without naming the device lands on the CPU and the step fails or waits on a copy.
    Here the roles are swapped: the data lives on the CPU while the default device is `meta`, so any tensor the
    data path or the augmentation makes without naming the batch's device breaks this test."""
    split, data = toy_split()
    cfg = config_from_dict({"batch_size": 16, "augment": ALL_AUGMENTATIONS})
    with torch.device("meta"):
        train_set = to_device(split, CPU)
        gen = torch.Generator(device=CPU).manual_seed(0)
        batches = list(epoch_batches(train_set, data, cfg, Runtime(0, 1, CPU, None), 0, gen))
    assert [x.shape[0] for x, _ in batches] == [16, 16, 16, 16]
    assert {x.device for x, _ in batches} == {y.device for _, y in batches} == {CPU}
    assert all(torch.isfinite(x).all() and x.min() >= 0 and x.max() <= 1 for x, _ in batches)


def test_processes_take_equal_disjoint_shards():
    """65 images over 3 processes: 21 each, none twice. Equal shards give equal step counts, so DDP's all-reduces
    pair up (unequal ones left a process waiting at the last step)."""
    split, data = toy_split(65)
    cfg = config_from_dict({"batch_size": 8})
    seen = []
    for rank in range(3):
        batches = epoch_batches(to_device(split, CPU), data, cfg, Runtime(rank, 3, CPU, None), 4, torch.Generator())
        seen.append(torch.cat([y for _, y in batches]).tolist())
    assert [len(s) for s in seen] == [21, 21, 21]
    assert len(set(seen[0] + seen[1] + seen[2])) == 63


def test_augmentation_statistics():
    """Each augmentation does what its setting says, in proportion, over 4,000 images."""
    n, gen = 4000, torch.Generator().manual_seed(0)
    ones = torch.ones(n, 1, 28, 28)
    cropped = augment(ones, AugmentConfig(crop_padding=2), gen)  # zero rows/columns come from the padding
    empty_rows = (cropped.sum(3) == 0).sum(2)[:, 0]
    assert empty_rows.max() == 2 and 0.16 < (empty_rows == 0).float().mean() < 0.24  # 5 offsets, 1 unshifted
    ramp = torch.linspace(0, 1, 28).expand(n, 1, 28, 28)
    flipped = augment(ramp, AugmentConfig(hflip=True), gen)[:, 0, 0, 0] == 1
    assert 0.45 < flipped.float().mean() < 0.55
    erased = augment(torch.zeros(n, 1, 28, 28), AugmentConfig(erasing=0.5), gen) > 0
    area = erased.float().mean(dim=(1, 2, 3))
    assert 0.45 < (area > 0).float().mean() < 0.55
    assert 0.05 < area[area > 0].mean() < 0.15 and area.max() <= 0.2
    assert augment(ones, AugmentConfig(), gen).equal(ones)


def test_devices_and_precisions():
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto") == (torch.device("cuda:0") if torch.cuda.is_available() else CPU)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="sees no GPU"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")
    assert autocast_dtype("auto", CPU) is None and autocast_dtype("off", CPU) is None
    assert autocast_dtype("bf16", CPU) == torch.bfloat16
    with pytest.raises(ValueError, match="unknown amp"):
        autocast_dtype("fp8", CPU)


def test_bf16_autocast_learns_on_cpu(tiny_fmnist, tmp_path):
    metrics = train(config_from_dict(toy_config(tiny_fmnist, tmp_path / "run", amp="bf16")))
    assert "bf16 autocast" in metrics["setup"]["runtime"]
    assert metrics["test_acc"] > 0.9, metrics["history"]


def test_compile_is_optional_and_learns(tiny_fmnist, tmp_path):
    """torch.compile's graph capture around the model (the eager backend: no code generation, which takes minutes
    on two cores); the checkpoint keeps the plain model's names."""
    try:
        torch.compile(lambda t: t + 1, backend="eager")(torch.ones(1))
    except Exception as e:  # noqa: BLE001 - e.g. a Python that this torch cannot compile for
        pytest.skip(f"torch.compile is not supported here: {e}")
    cfg = toy_config(tiny_fmnist, tmp_path / "run", compile=True, compile_backend="eager", batch_size=30)
    metrics = train(config_from_dict(cfg))
    assert metrics["setup"]["compile"] and metrics["test_acc"] > 0.9, metrics["history"]
    load_checkpoint(tmp_path / "run" / "checkpoint.pt")


def test_resume_continues_as_if_never_stopped(tiny_fmnist, tmp_path):
    """A run stopped after its first epoch (time limit) and resumed ends exactly where an uninterrupted run does:
    the model, the optimiser's momentum and the epoch's data order all carry over. (No dropout or augmentation
    here: their random streams restart on resume.)"""
    def without_timing(history):
        return [{k: v for k, v in h.items() if k not in ("elapsed_s", "train_images_per_s")} for h in history]

    base = toy_config(tiny_fmnist, tmp_path / "straight", model_args={"widths": [8, 8, 8, 8], "dropout": 0.0})
    straight = train(config_from_dict(base))
    first = train(config_from_dict({**base, "out_dir": str(tmp_path / "resumed"), "time_limit_s": 1e-6}))
    assert first["epochs_run"] == 1 and "time limit" in first["stopped_early"]
    resumed = train(config_from_dict({**base, "out_dir": str(tmp_path / "resumed"), "resume": True}))
    assert resumed["epochs_run"] == 3 and "stopped_early" not in resumed
    assert without_timing(resumed["history"]) == without_timing(straight["history"])
    assert resumed["test_acc"] == straight["test_acc"] > 0.9
