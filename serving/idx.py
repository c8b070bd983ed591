"""IDX files (LeCun's MNIST format), optionally gzipped: shared by the batch job and the training loader."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class IdxError(Exception):
    """Bytes that are not a well-formed IDX file; the message says what is wrong."""


def parse_idx(raw: bytes) -> np.ndarray:
    """Decode IDX bytes: magic (0, 0, dtype, ndim), big-endian dims, then the data."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise IdxError(f"not an IDX file: bad magic number {raw[:4].hex()}")
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code not in _DTYPES:
        raise IdxError(f"IDX data type 0x{dtype_code:02x} is unknown")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IdxError("IDX file truncated inside its header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_DTYPES[dtype_code])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise IdxError(f"IDX payload is {len(raw) - header} bytes, shape {list(shape)} needs {expected}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def read_maybe_gz(path: str | Path) -> bytes:
    data = Path(path).read_bytes()
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def read_idx(path: str | Path) -> np.ndarray:
    try:
        return parse_idx(read_maybe_gz(path))
    except IdxError as e:
        raise IdxError(f"{path}: {e}") from None
