"""Hybrid images as negative data for unsupervised FF (sec. 3.2, figure 1).

A mask with large regions of ones and zeros comes from a random bit image (an explicit input, so
every backend and device makes the same negatives) blurred ``blur_passes`` times with
[1/4, 1/2, 1/4] horizontally and then vertically, and thresholded at 0.5 (exactly 0.5 counts as 0).
The negative is one digit where the mask is 1 and a different digit where it is 0.

Edges: the filter repeats the edge pixel (replicate padding). That keeps the total of every row
and column, so a border pixel is as likely to end up 1 as a central one; zero padding would pull
the borders towards 0 and give the second digit the whole frame. Every blurred value is a
multiple of 2^-(4 * passes) in [0, 1], so up to 6 passes the blur is exact in fp32 and every
backend thresholds identically.
"""

from __future__ import annotations

from ..core.builder import Builder
from ..core.program import Value
from ..core.spec import Model


def _blur_axis(b: Builder, img: Value, axis: int) -> Value:
    """One [1/4, 1/2, 1/4] pass along ``axis`` with the edge pixel repeated."""
    n = img.shape[axis]
    before = b.concat([b.slice(img, axis, 0, 1), b.slice(img, axis, 0, n - 1)], axis)  # neighbour at -1
    after = b.concat([b.slice(img, axis, 1, n), b.slice(img, axis, n - 1, n)], axis)   # neighbour at +1
    return b.add(b.mul(b.add(before, after), 0.25), b.mul(img, 0.5))


def blurred_bits(b: Builder, bits: Value, model: Model) -> Value:
    """[rows, pixels] random bits -> their blur, same shape."""
    rows = bits.shape[0]
    height, width = model.input.image_shape
    with b.scope("blur"):
        img = b.reshape(bits, [rows, height, width])
        for _ in range(model.negatives.blur_passes):
            img = _blur_axis(b, _blur_axis(b, img, 2), 1)
        return b.reshape(img, [rows, height * width])


def hybrid_images(b: Builder, x: Value, x_other: Value, bits: Value, model: Model) -> tuple[Value, Value]:
    """(negatives, mask): x where the thresholded blur is 1, x_other where it is 0. Every pixel of a
    negative is exactly the pixel of one of its two sources."""
    with b.scope("hybrid"):
        keep = b.less(0.5, blurred_bits(b, bits, model))
        mask = b.cast(keep, "float32")
        return b.where(keep, x, x_other), mask
