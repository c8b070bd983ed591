"""IDX files, the neutral reader that training and batch jobs share."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from serving.idx import IdxError, parse_idx, read_idx


def idx_bytes(array: np.ndarray) -> bytes:
    code = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}[array.dtype]
    return bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def test_plain_and_gzipped_files_read_back(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "plain").write_bytes(idx_bytes(images))
    (tmp_path / "packed.gz").write_bytes(gzip.compress(idx_bytes(images)))
    for name in ("plain", "packed.gz"):
        np.testing.assert_array_equal(read_idx(tmp_path / name), images)
    np.testing.assert_array_equal(parse_idx(idx_bytes(np.array([1, -2], ">i4"))), [1, -2])


@pytest.mark.parametrize(("raw", "message"), [
    (b"\x01\x00\x08\x01", "bad magic number"),
    (b"\x00\x00\x42\x01", "data type 0x42 is unknown"),
    (b"\x00\x00\x08\x02\x00\x00", "truncated inside its header"),
    (b"\x00\x00\x08\x01\x00\x00\x00\x05abc", "payload is 3 bytes, shape [5] needs 5"),
])
def test_malformed_files_say_what_is_wrong(raw, message, tmp_path):
    with pytest.raises(IdxError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_idx(raw)
    (tmp_path / "bad").write_bytes(raw)
    with pytest.raises(IdxError, match="bad: "):  # the file is named
        read_idx(tmp_path / "bad")
