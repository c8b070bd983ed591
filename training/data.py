"""Datasets: IDX files (Fashion-MNIST, MNIST), CIFAR-10 python batches and class-per-folder images.

Every loader returns uint8 images as a numpy array [N, H, W, C] plus int64 labels; conversion to the
model's input (resize, channels, scaling to [0, 1]) and augmentation happen in the training loop
(`augment.to_model_input`, `augment.augment`), so that all datasets feed every model the same way.
Normalisation (mean/std) lives inside the model graph.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving.idx import IdxError, read_maybe_gz
from serving.idx import parse_idx as _parse_idx

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
MNIST_CLASSES = [str(i) for i in range(10)]
CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# SHA-256 of the *decompressed* IDX bytes: the upstream and the Debian gzip files differ only in their
# gzip headers, so checking the payload accepts both.
IDX_SHA256 = {
    "fashion-mnist": {
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
    "mnist": {
        "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    },
}

DOWNLOAD_URLS = {
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
}

DEFAULT_DIRS = {
    "fashion-mnist": ("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"),
    "mnist": ("MNIST_DIR", "/usr/share/datasets/mnist"),
}


class DatasetError(RuntimeError):
    """Raised when a dataset is missing, malformed or fails its checksum."""


@dataclass
class Split:
    images: np.ndarray  # uint8 [N, H, W, C]
    labels: np.ndarray  # int64 [N]


@dataclass
class Dataset:
    name: str
    classes: list[str]
    train: Split
    test: Split | None


def parse_idx(raw: bytes) -> np.ndarray:
    try:
        return _parse_idx(raw)
    except IdxError as e:
        raise DatasetError(str(e)) from None


def find_idx_dir(dataset: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Return the first directory holding the dataset: explicit dir, then env var, then Debian's path."""
    env_var, system_dir = DEFAULT_DIRS[dataset]
    candidates = [data_dir, os.environ.get(env_var), system_dir]
    tried = []
    for cand in candidates:
        if not cand:
            continue
        p = Path(cand)
        tried.append(str(p))
        if any((p / (name + ext)).exists() for name in IDX_FILES.values() for ext in (".gz", "")):
            return p
    raise DatasetError(
        f"{dataset} not found (looked in: {', '.join(tried) or 'nothing'}). Give its directory (train: "
        f"data_dir=DIR; export: --data-dir DIR), set ${env_var}, install Debian's dataset-{dataset} package, or "
        f"let train fetch it with download=true."
    )


def _locate(directory: Path, name: str) -> Path:
    for ext in (".gz", ""):
        p = directory / (name + ext)
        if p.exists():
            return p
    raise DatasetError(f"{directory} has no {name}(.gz)")


def load_idx_file(directory: Path, name: str, dataset: str | None, verify: bool = True) -> np.ndarray:
    raw = read_maybe_gz(_locate(directory, name))
    expected = IDX_SHA256.get(dataset or "", {}).get(name)
    if verify and expected is not None:
        got = hashlib.sha256(raw).hexdigest()
        if got != expected:
            raise DatasetError(f"{directory / name}: SHA-256 {got} does not match the official {expected}")
    return parse_idx(raw)


def download_idx(dataset: str, directory: Path) -> None:
    """Fetch the four gz files (only on explicit request); each is verified after decompression."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in IDX_FILES.values():
        target = directory / f"{name}.gz"
        if target.exists():
            continue
        tmp = target.with_suffix(".gz.part")
        urllib.request.urlretrieve(DOWNLOAD_URLS[dataset] + target.name, tmp)
        digest = hashlib.sha256(gzip.decompress(tmp.read_bytes())).hexdigest()
        expected = IDX_SHA256.get(dataset, {}).get(name)
        if expected and digest != expected:
            tmp.unlink()
            raise DatasetError(f"downloaded {target.name} fails its checksum")
        tmp.rename(target)


def load_idx_dataset(
    dataset: str = "fashion-mnist", data_dir: str | os.PathLike | None = None, download: bool = False,
    verify: bool = True,
) -> Dataset:
    try:
        directory = find_idx_dir(dataset, data_dir)
    except DatasetError:
        if not download:
            raise
        directory = Path(data_dir or Path.home() / ".cache" / "cnn-serving" / dataset)
        download_idx(dataset, directory)

    def split(prefix: str) -> Split | None:
        try:
            images = load_idx_file(directory, IDX_FILES[f"{prefix}_images"], dataset, verify)
            labels = load_idx_file(directory, IDX_FILES[f"{prefix}_labels"], dataset, verify)
        except DatasetError as e:
            if "has no" in str(e) and prefix == "test":
                return None
            raise
        if len(images) != len(labels):
            raise DatasetError(f"{prefix}: {len(images)} images but {len(labels)} labels")
        return Split(images[..., None].copy(), labels.astype(np.int64))

    train = split("train")
    classes = FASHION_MNIST_CLASSES if dataset == "fashion-mnist" else MNIST_CLASSES
    return Dataset(dataset, classes, train, split("test"))


def load_cifar10(data_dir: str | os.PathLike) -> Dataset:
    """CIFAR-10 'python version' batches (data_batch_1..5, test_batch) from a directory."""
    d = Path(data_dir)
    if (d / "cifar-10-batches-py").is_dir():
        d = d / "cifar-10-batches-py"

    def read(names: list[str]) -> Split:
        xs, ys = [], []
        for n in names:
            with open(d / n, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            xs.append(np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            ys.append(np.asarray(batch[b"labels"], np.int64))
        return Split(np.concatenate(xs), np.concatenate(ys))

    train_names = sorted(p.name for p in d.glob("data_batch_*"))
    if not train_names:
        raise DatasetError(f"{d} has no CIFAR-10 data_batch_* files")
    test = read(["test_batch"]) if (d / "test_batch").exists() else None
    return Dataset("cifar10", CIFAR10_CLASSES, read(train_names), test)


IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


def load_image_folder(data_dir: str | os.PathLike, size: tuple[int, int], channels: int) -> Dataset:
    """Class-per-folder images (root/<class>/*.png); an optional root/test/<class>/ is the test split."""
    from PIL import Image

    root = Path(data_dir)

    def read(base: Path, classes: list[str]) -> Split:
        xs, ys = [], []
        for idx, cls in enumerate(classes):
            for p in sorted((base / cls).iterdir()) if (base / cls).is_dir() else []:
                if p.suffix.lower() not in IMAGE_EXTENSIONS:
                    continue
                with Image.open(p) as im:
                    im = im.convert("L" if channels == 1 else "RGB").resize((size[1], size[0]), Image.BILINEAR)
                    arr = np.asarray(im, np.uint8)
                xs.append(arr.reshape(size[0], size[1], channels))
                ys.append(idx)
        if not xs:
            raise DatasetError(f"{base} has no images in class folders")
        return Split(np.stack(xs), np.asarray(ys, np.int64))

    train_root = root / "train" if (root / "train").is_dir() else root
    classes = sorted(p.name for p in train_root.iterdir() if p.is_dir() and p.name != "test")
    if not classes:
        raise DatasetError(f"{root} has no class folders")
    test = read(root / "test", classes) if (root / "test").is_dir() else None
    return Dataset(root.name, classes, read(train_root, classes), test)


def load_dataset(name: str, data_dir: str | None = None, download: bool = False,
                 size: tuple[int, int] = (28, 28), channels: int = 1, verify: bool = True) -> Dataset:
    if name in ("fashion-mnist", "mnist"):
        return load_idx_dataset(name, data_dir, download, verify)
    if name == "cifar10":
        if not data_dir:
            raise DatasetError("cifar10 needs data_dir= pointing at cifar-10-batches-py")
        return load_cifar10(data_dir)
    if name == "folder":
        if not data_dir:
            raise DatasetError("folder datasets need data_dir= (one subfolder per class)")
        return load_image_folder(data_dir, size, channels)
    raise DatasetError(f"unknown dataset {name!r}: fashion-mnist, mnist, cifar10 or folder")


def train_val_split(split: Split, val_fraction: float, seed: int) -> tuple[Split, Split]:
    """Stratified split so that every class keeps its share in the validation set."""
    rng = np.random.default_rng(seed)
    val_idx = []
    for c in np.unique(split.labels):
        idx = np.flatnonzero(split.labels == c)
        rng.shuffle(idx)
        val_idx.append(idx[: int(round(len(idx) * val_fraction))])
    val = np.sort(np.concatenate(val_idx))
    mask = np.ones(len(split.labels), bool)
    mask[val] = False
    return Split(split.images[mask], split.labels[mask]), Split(split.images[val], split.labels[val])
