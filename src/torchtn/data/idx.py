"""Reader for the IDX format of MNIST-style files (raw or gzip), with no dependency beyond NumPy.

Reading costs memory and time proportional to what the header legitimately describes: the header is read and checked
(type code, number of dimensions, dimensions against what the caller expects, total size against a cap) before the
payload; a gzip file is decompressed as a stream, never beyond the size its header promises.
"""
from __future__ import annotations

import gzip
import math
import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["read_idx", "MAX_IDX_BYTES"]

# IDX type codes → big-endian NumPy dtypes
_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
MAX_IDX_BYTES = 1 << 30  # no standard IDX file comes near this (MNIST train images: 47 MB)
_MAX_NDIM = 8


def _open(path: Path):
    with open(path, "rb") as fh:
        magic = fh.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def _read_exact(fh, n: int, path: Path, what: str) -> bytes:
    try:
        data = fh.read(n)
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(f"{path}: gzip data is corrupt ({err})") from None
    if len(data) != n:
        raise ValueError(f"{path}: {what}: expected {n} bytes, the file ends after {len(data)}")
    return data


def read_idx(path: str | os.PathLike, *, expect_ndim: int | None = None,
             expect_tail: Sequence[int] | None = None, max_bytes: int = MAX_IDX_BYTES) -> np.ndarray:
    """Read an IDX file (``.gz`` or raw, detected from its bytes) into an array of its dims and native-endian dtype.

    ``expect_ndim`` / ``expect_tail``: the number of dimensions and the trailing dimensions the caller needs (for
    MNIST images: 3 and ``(28, 28)``), checked from the header before the payload is read. Raises ``ValueError``
    naming the file when the header is not IDX, disagrees with the expectations, promises more than ``max_bytes``, or
    the payload size does not match it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no IDX file at {path}")
    try:
        fh = _open(path)
    except OSError as err:
        raise ValueError(f"{path} cannot be read ({err.strerror or err})") from None
    with fh:
        head = _read_exact(fh, 4, path, "IDX header")
        if head[0] != 0 or head[1] != 0 or head[2] not in _DTYPES or not 1 <= head[3] <= _MAX_NDIM:
            raise ValueError(f"{path} is not an IDX file: it must start with two zero bytes, a type code in "
                             f"{sorted(hex(k) for k in _DTYPES)} and 1 to {_MAX_NDIM} dimensions, got {head.hex()}")
        dtype = np.dtype(_DTYPES[head[2]])
        ndim = head[3]
        dims = tuple(int(v) for v in np.frombuffer(_read_exact(fh, 4 * ndim, path, "IDX dimensions"), dtype=">u4"))
        if expect_ndim is not None and ndim != expect_ndim:
            raise ValueError(f"{path}: holds {ndim}-dimensional data {dims}, expected {expect_ndim} dimensions")
        if expect_tail is not None and tuple(dims[len(dims) - len(expect_tail):]) != tuple(expect_tail):
            raise ValueError(f"{path}: holds items of shape {dims[1:]}, expected {tuple(expect_tail)}")
        expected = math.prod(dims) * dtype.itemsize
        if expected > max_bytes:
            raise ValueError(f"{path}: header promises dims {dims} of {dtype.name} ({expected:,} bytes), more than "
                             f"the {max_bytes:,} allowed")
        payload = _read_exact(fh, expected, path, f"header promises dims {dims} of {dtype.name} ({expected} bytes)")
        if _read_exact_or_less(fh, path):
            raise ValueError(f"{path}: header promises dims {dims} of {dtype.name} ({expected} bytes) but the file "
                             f"holds more data after them")
    arr = np.frombuffer(payload, dtype=dtype).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def _read_exact_or_less(fh, path: Path) -> bytes:
    try:
        return fh.read(1)
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(f"{path}: gzip data is corrupt ({err})") from None
