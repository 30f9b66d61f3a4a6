"""Read and write IDX files (the MNIST container format), raw or gzip-compressed.

Layout: two zero bytes, a dtype code, the number of dimensions, one big-endian
uint32 per dimension, then the values in big-endian row-major order.
"""

from __future__ import annotations

import gzip as gz
import os
import zlib
from pathlib import Path

import numpy as np

from ffcompile.core.errors import FFCompileError


class DataError(FFCompileError):
    """A data file is missing, corrupt or does not match its checksum."""


GZIP_MAGIC = b"\x1f\x8b"

DTYPE_BY_CODE = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
CODE_BY_KIND = {(dtype.kind, dtype.itemsize): code for code, dtype in DTYPE_BY_CODE.items()}


def decompress_if_gzip(data: bytes, source: str | os.PathLike) -> bytes:
    """Return the IDX bytes of `data`, gunzipping it when it starts with the gzip magic."""
    if not data.startswith(GZIP_MAGIC):
        return data
    try:
        return gz.decompress(data)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{source}: corrupt gzip stream ({one_line(err)})") from None


def parse_idx(data: bytes, source: str | os.PathLike) -> np.ndarray:
    """Decode IDX bytes (raw or gzip). `source` names the file in error messages."""
    data = decompress_if_gzip(data, source)
    if len(data) < 4 or data[0:2] != b"\x00\x00" or data[2] not in DTYPE_BY_CODE:
        raise DataError(f"{source}: not an IDX file (bad magic number {data[:4].hex() or 'empty'})")
    dtype, ndim = DTYPE_BY_CODE[data[2]], data[3]
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise DataError(f"{source}: truncated IDX header ({len(data)} bytes, need {header_size})")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header_size + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) < expected:
        raise DataError(f"{source}: truncated IDX payload ({len(data)} bytes, header {shape} needs {expected})")
    if len(data) > expected:
        raise DataError(f"{source}: {len(data) - expected} bytes of trailing garbage after IDX payload {shape}")
    values = np.frombuffer(data, dtype=dtype, offset=header_size).reshape(shape)
    return values.astype(dtype.newbyteorder("="))  # native byte order, writable copy


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file, gzip-compressed or not (detected from its first bytes, not its name)."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise DataError(f"cannot read IDX file {path}: {err.strerror or err}") from None
    return parse_idx(data, path)


def encode_idx(array: np.ndarray) -> bytes:
    """Encode an array as uncompressed IDX bytes."""
    array = np.asarray(array)
    code = CODE_BY_KIND.get((array.dtype.kind, array.dtype.itemsize))
    if code is None:
        raise ValueError(f"IDX cannot store dtype {array.dtype}")
    if array.ndim > 255:
        raise ValueError(f"IDX cannot store {array.ndim} dimensions")
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + np.ascontiguousarray(array, dtype=DTYPE_BY_CODE[code]).tobytes()


def write_idx(path: str | os.PathLike, array: np.ndarray, gzip: bool = True) -> None:
    """Write `array` as an IDX file; gzip output is byte-for-byte reproducible (mtime 0, no name)."""
    data = encode_idx(array)
    if gzip:
        data = gz.compress(data, compresslevel=9, mtime=0)
    Path(path).write_bytes(data)


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__
