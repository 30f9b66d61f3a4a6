"""Jittered MNIST: images shifted by up to 2 pixels in each direction, zero-filled (25 shifts)."""

from __future__ import annotations

import numpy as np

SIDE = 28


def shift_images(images: np.ndarray, dx, dy) -> np.ndarray:
    """Shift each flattened 28x28 image by (dx[i], dy[i]) pixels, filling uncovered pixels with 0.

    Positive dx moves the content right (towards higher columns), positive dy
    moves it down (towards higher rows). `dx`/`dy` are ints or arrays of length N.
    """
    images = np.asarray(images)
    n = images.shape[0]
    dx = np.broadcast_to(np.asarray(dx, dtype=np.int64), (n,))
    dy = np.broadcast_to(np.asarray(dy, dtype=np.int64), (n,))
    grids = images.reshape(n, SIDE, SIDE)
    shifted = np.zeros_like(grids)
    # Loop over the few distinct shifts, not over images.
    for sx, sy in set(zip(dx.tolist(), dy.tolist())):
        if abs(sx) >= SIDE or abs(sy) >= SIDE:
            continue  # everything moved out of frame
        rows = np.flatnonzero((dx == sx) & (dy == sy))
        dst_y, src_y = _overlap(sy)
        dst_x, src_x = _overlap(sx)
        shifted[rows, dst_y, dst_x] = grids[rows, src_y, src_x]
    return shifted.reshape(images.shape)


def _overlap(shift: int) -> tuple[slice, slice]:
    """Destination and source slices along one axis for a shift of `shift` pixels."""
    if shift >= 0:
        return slice(shift, SIDE), slice(0, SIDE - shift)
    return slice(0, SIDE + shift), slice(-shift, SIDE)


def random_shifts(rng: np.random.Generator, n: int, max_shift: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Draw n shifts uniformly from the (2 * max_shift + 1) ** 2 possible (dx, dy) pairs."""
    dx = rng.integers(-max_shift, max_shift + 1, size=n)
    dy = rng.integers(-max_shift, max_shift + 1, size=n)
    return dx, dy


def jitter(images: np.ndarray, rng: np.random.Generator, max_shift: int = 2) -> np.ndarray:
    """Shift every image by its own random shift of at most `max_shift` pixels per axis."""
    return shift_images(images, *random_shifts(rng, len(images), max_shift))
