import gzip
import hashlib
import struct

import numpy as np
import pytest

from training import data


def write_idx(path, array: np.ndarray, compress: bool = True) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return raw


@pytest.fixture
def idx_dir(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (50, 28, 28), dtype=np.uint8)
    labels = np.arange(50) % 10
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", images[:20], compress=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels[:20], compress=False)
    return tmp_path, images, labels


def test_parse_idx_round_trip(idx_dir):
    directory, images, labels = idx_dir
    ds = data.load_idx_dataset("mnist", directory, verify=False)
    assert ds.train.images.shape == (50, 28, 28, 1)
    np.testing.assert_array_equal(ds.train.images[..., 0], images)
    np.testing.assert_array_equal(ds.train.labels, labels)
    assert ds.test.images.shape == (20, 28, 28, 1)


def test_checksum_mismatch_is_reported(idx_dir):
    directory, _, _ = idx_dir
    with pytest.raises(data.DatasetError, match="SHA-256"):
        data.load_idx_dataset("fashion-mnist", directory)


def test_checksum_accepts_matching_payload(tmp_path, monkeypatch):
    raw = write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(10))
    monkeypatch.setitem(data.IDX_SHA256, "toy", {"train-labels-idx1-ubyte": hashlib.sha256(raw).hexdigest()})
    labels = data.load_idx_file(tmp_path, "train-labels-idx1-ubyte", "toy")
    np.testing.assert_array_equal(labels, np.arange(10))


@pytest.mark.parametrize("raw, message", [
    (b"\x01\x00\x08\x01", "magic"),
    (bytes([0, 0, 0x08, 1]) + struct.pack(">I", 10) + b"\x00" * 3, "payload"),
    (bytes([0, 0, 0x42, 1]) + struct.pack(">I", 1) + b"\x00", "unknown"),
])
def test_malformed_idx(raw, message):
    with pytest.raises(data.DatasetError, match=message):
        data.parse_idx(raw)


def test_search_order_explicit_then_env(idx_dir, tmp_path_factory, monkeypatch):
    directory, _, _ = idx_dir
    other = tmp_path_factory.mktemp("empty")
    # Debian's directory is the last place searched: a machine with the package installed must not answer here.
    monkeypatch.setitem(data.DEFAULT_DIRS, "fashion-mnist", ("FASHION_MNIST_DIR", str(other)))
    monkeypatch.setenv("FASHION_MNIST_DIR", str(directory))
    assert data.find_idx_dir("fashion-mnist", None) == directory
    with pytest.raises(data.DatasetError, match="not found"):
        monkeypatch.setenv("FASHION_MNIST_DIR", str(other))
        data.find_idx_dir("fashion-mnist", other)


def test_stratified_split_keeps_class_shares():
    labels = np.repeat(np.arange(10), 100)
    split = data.Split(np.zeros((1000, 2, 2, 1), np.uint8), labels)
    train, val = data.train_val_split(split, 0.1, seed=0)
    assert len(val.labels) == 100 and len(train.labels) == 900
    assert np.bincount(val.labels).tolist() == [10] * 10


def test_image_folder(tmp_path):
    from PIL import Image
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new("RGB", (40, 30), (i * 50, 0, 0)).save(tmp_path / cls / f"{i}.png")
    ds = data.load_image_folder(tmp_path, (32, 32), 3)
    assert ds.classes == ["cat", "dog"]
    assert ds.train.images.shape == (6, 32, 32, 3)
    assert ds.train.labels.tolist() == [0, 0, 0, 1, 1, 1]
