"""Checks on user data before it reaches a compiled program: compiled programs have fixed shapes
and dtypes and no error reporting of their own, so bad data must be caught here, in one line."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..core.errors import FFCompileError


class InputError(FFCompileError):
    pass


def as_images(x, size: int, what: str = "x") -> np.ndarray:
    """``x`` as float32 [N, size], finite; any real numeric dtype is accepted."""
    try:
        arr = np.asarray(x)
    except (ValueError, TypeError) as e:
        raise InputError(f"{what}: not an array of numbers ({e})") from None
    if arr.dtype.kind not in "buif":
        raise InputError(f"{what}: dtype {arr.dtype} cannot be used as float32 pixels (need a real numeric array)")
    if arr.ndim != 2 or arr.shape[1] != size:
        raise InputError(f"{what}: expected shape [N, {size}] (one flattened image per row), got {list(arr.shape)}")
    if arr.shape[0] == 0:
        raise InputError(f"{what}: no rows")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    bad = ~np.isfinite(arr)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise InputError(f"{what}: {int(bad.sum())} NaN/inf value(s) (first in row {row}); "
                         "the compiled programs need finite inputs")
    return arr


def as_labels(y, rows: int, classes: int, what: str = "y") -> np.ndarray:
    """``y`` as int64 [rows] with values in 0..classes-1."""
    arr = np.asarray(y)
    if arr.dtype.kind not in "ui":
        raise InputError(f"{what}: labels must be integers, got dtype {arr.dtype}")
    if arr.shape != (rows,):
        raise InputError(f"{what}: expected {rows} labels (shape [{rows}]), got shape {list(arr.shape)}")
    if arr.size and (arr.min() < 0 or arr.max() >= classes):
        raise InputError(f"{what}: labels must be in 0..{classes - 1}, got values from {arr.min()} to {arr.max()}")
    return arr.astype(np.int64)


MAX_NPY_BYTES = 16 << 30


def read_npy(path: Path, what: str) -> np.ndarray:
    """A .npy array without pickles, after checking that its header describes the bytes the file
    holds (a header may claim any shape: numpy would try to allocate it, or fail deep inside)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            header_end = f.tell()
    except FileNotFoundError:
        raise InputError(f"{what} {path}: file not found") from None
    except (ValueError, OSError, SyntaxError, TypeError) as e:
        raise InputError(f"{what} {path}: not a readable .npy array ({str(e).splitlines()[0][:200]})") from None
    if dtype.hasobject:
        raise InputError(f"{what} {path}: holds Python objects; only numeric .npy arrays without pickles are read")
    count = 1
    for d in shape:
        count *= d
    need = count * dtype.itemsize
    have = os.path.getsize(path) - header_end
    if need != have:
        raise InputError(f"{what} {path}: its header says {list(shape)} {dtype} ({need} bytes), "
                         f"but the file holds {have} bytes of data")
    if need > MAX_NPY_BYTES:
        raise InputError(f"{what} {path}: {need} bytes is more than the {MAX_NPY_BYTES} bytes read at once")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise InputError(f"{what} {path}: not a readable .npy array without pickles ({str(e).splitlines()[0]})") from None


def scaled_images(x: np.ndarray, scale: float | None, what: str = "--input") -> np.ndarray:
    """Images divided by ``scale`` (e.g. 255 for bytes); refused when outside [0, 1] afterwards:
    the models are trained on pixels in [0, 1] and would answer wrongly without a word."""
    if scale is not None:
        if not (np.isfinite(scale) and scale > 0):
            raise InputError(f"--input-scale must be a positive finite number, got {scale}")
        x = np.asarray(x, np.float64) / scale
    arr = np.asarray(x)
    if arr.dtype.kind in "buif" and arr.size:
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        if lo < 0 or hi > 1:
            raise InputError(f"{what}: values from {lo:g} to {hi:g} are outside [0, 1], the range the model was "
                             "trained on; pass --input-scale 255 for 0..255 images (or the scale of your data)")
    return arr
