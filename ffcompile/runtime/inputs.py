"""Checks on user data before it reaches a compiled program: compiled programs have fixed shapes
and dtypes and no error reporting of their own, so bad data must be caught here, in one line."""

from __future__ import annotations

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
