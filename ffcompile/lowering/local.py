"""Locally connected layers without weight sharing (footnote 8).

Unit order within a layer is (grid_y, grid_x, channel). A unit at grid point (gy, gx) sees a
``field`` x ``field`` window whose top-left corner is (gy * stride, gx * stride) in the layer
below: pixels of the input image for the first layer, grid points (all their channels) for later
ones. Window inputs are ordered (dy, dx, channel).

Two equivalent lowerings:

- **masked dense** (footnote 13, the definition): the weight is a dense [out, in] matrix with a
  constant 0/1 connectivity mask. It stays exactly zero off the mask: those weights start at 0
  and every gradient (local rule, peer normalization) is multiplied by the mask, so weight decay,
  momentum and Adam slots stay 0 there too.
- **blocked** (what ``build_program`` emits): the weight is stored compactly as [out, field *
  field * channels below], one row per unit holding only its receptive field. Each grid location
  gathers its window with slices and runs one small matmul (forward and weight gradient).

Blocked is kept because it is faster wherever we measured (``tools/bench_local.py``, paper sizes,
batch 100): the whole train step of models/mnist-local.toml takes ~0.45 s vs ~1.9 s with the torch
backend and ~0.14 s vs ~0.65 s with onnxruntime on 1 CPU thread, and ~23 ms vs ~63 ms with torch
on an H200 (per layer 3-7x faster). It does 2.3-8x fewer multiply-adds (the masked matrices are
87 %, 75 % and 56 % zeros) and its optimizer updates touch that many fewer weights; the slices
and the 1.6x more (small) ops it adds are cheap next to that.

``dense_weight`` / ``compact_weight`` convert between the two layouts.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

from ..program.builder import Builder
from ..program.ir import Value
from ..spec import LocalLayer, Model

FORMS = ("blocked", "masked_dense")
LOWERING = "blocked"  # the form build_program emits; ``lowering_form`` switches it for benchmarks and tests


@contextlib.contextmanager
def lowering_form(form: str):
    """Build programs and initial state in ``form`` inside the block."""
    global LOWERING
    if form not in FORMS:
        raise ValueError(f"unknown local-layer form {form!r} (known: {', '.join(FORMS)})")
    saved, LOWERING = LOWERING, form
    try:
        yield
    finally:
        LOWERING = saved


def _form(form: str | None) -> str:
    return LOWERING if form is None else form


@dataclass(frozen=True)
class Geometry:
    """Where a local layer's units look in the layer below (a side x side grid of ``below_channels``)."""

    side: int
    below_channels: int
    grid: int
    field: int
    stride: int
    channels: int

    @property
    def locations(self) -> int:
        return self.grid * self.grid

    @property
    def window(self) -> int:
        """Inputs of one unit: field * field * channels below."""
        return self.field * self.field * self.below_channels

    @property
    def dense_fan_in(self) -> int:
        return self.side * self.side * self.below_channels

    def origins(self) -> list[tuple[int, int]]:
        return [(gy * self.stride, gx * self.stride) for gy in range(self.grid) for gx in range(self.grid)]

    def window_indices(self) -> np.ndarray:
        """[locations, window] indices into the layer below's flattened (y, x, channel) vector."""
        dy, dx, c = np.meshgrid(np.arange(self.field), np.arange(self.field), np.arange(self.below_channels),
                                indexing="ij")
        offsets = ((dy * self.side + dx) * self.below_channels + c).ravel()
        return np.array([(oy * self.side + ox) * self.below_channels + offsets for oy, ox in self.origins()])


def geometry(model: Model, i: int) -> Geometry:
    layer = model.layers[i]
    if not isinstance(layer, LocalLayer):
        raise TypeError(f"layer {layer.name!r} is not a local layer")
    if i == 0:
        side, below_channels = model.input.image_shape[0], 1
    else:
        below = model.layers[i - 1]
        side, below_channels = below.grid, below.channels
    return Geometry(side, below_channels, layer.grid, layer.field, layer.stride, layer.channels)


def is_local(model: Model, i: int) -> bool:
    return isinstance(model.layers[i], LocalLayer)


def local_mask(model: Model, i: int) -> np.ndarray:
    """The 0/1 connectivity [out, in] of local layer i: exactly ``window`` ones per row."""
    geo = geometry(model, i)
    mask = np.zeros((model.layers[i].size, geo.dense_fan_in), np.float32)
    rows = np.arange(model.layers[i].size).reshape(geo.locations, geo.channels)
    for loc, cols in enumerate(geo.window_indices()):
        mask[np.ix_(rows[loc], cols)] = 1.0
    return mask


def weight_shape(model: Model, i: int, form: str | None = None) -> tuple[int, int]:
    geo = geometry(model, i)
    return (model.layers[i].size, geo.window if _form(form) == "blocked" else geo.dense_fan_in)


def _unit_columns(model: Model, i: int) -> np.ndarray:
    """[out, window]: the dense input index of each compact weight column, per unit."""
    geo = geometry(model, i)
    return np.repeat(geo.window_indices(), geo.channels, axis=0)


def dense_weight(model: Model, i: int, compact: np.ndarray) -> np.ndarray:
    """Compact [out, window] -> dense [out, in], zero off the receptive fields."""
    dense = np.zeros((compact.shape[0], geometry(model, i).dense_fan_in), compact.dtype)
    np.put_along_axis(dense, _unit_columns(model, i), compact, axis=1)
    return dense


def compact_weight(model: Model, i: int, dense: np.ndarray) -> np.ndarray:
    """Dense [out, in] -> compact [out, window] (drops whatever lies off the mask)."""
    return np.take_along_axis(dense, _unit_columns(model, i), axis=1)


def init_weight(model: Model, i: int, rng: np.random.Generator, form: str | None = None) -> np.ndarray:
    """U(-1/sqrt(k), 1/sqrt(k)) with k the unit's real fan-in (its window); zero off the mask."""
    geo = geometry(model, i)
    bound = 1.0 / np.sqrt(geo.window)
    compact = rng.uniform(-bound, bound, size=(model.layers[i].size, geo.window)).astype(np.float32)
    return compact if _form(form) == "blocked" else dense_weight(model, i, compact)


# -- tensor-program pieces ------------------------------------------------------------------

def patches(b: Builder, x: Value, geo: Geometry) -> list[Value]:
    """One [rows, window] value per location: the window's inputs in (dy, dx, channel) order."""
    rows = x.shape[0]
    with b.scope("gather"):
        grid = b.reshape(x, [rows, geo.side, geo.side, geo.below_channels])
        out = []
        for oy, ox in geo.origins():
            win = b.slice(b.slice(grid, 1, oy, oy + geo.field), 2, ox, ox + geo.field)
            out.append(b.reshape(win, [rows, geo.window]))
        return out


def _unit_block(b: Builder, v: Value, axis: int, loc: int, geo: Geometry) -> Value:
    return b.slice(v, axis, loc * geo.channels, (loc + 1) * geo.channels)


def forward(b: Builder, x: Value, weight: Value, bias: Value, model: Model, i: int, form: str | None = None) -> Value:
    """Pre-activation z [rows, out]."""
    if _form(form) == "masked_dense":
        return b.add(b.matmul(x, weight, trans_b=True), bias)
    geo = geometry(model, i)
    per_location = [b.matmul(p, _unit_block(b, weight, 0, loc, geo), trans_b=True)
                    for loc, p in enumerate(patches(b, x, geo))]
    return b.add(b.concat(per_location, axis=1), bias)


def weight_gradient(b: Builder, dz: Value, x: Value, model: Model, i: int, form: str | None = None) -> Value:
    """dz^T x restricted to the connectivity: [out, in] masked (masked dense) or [out, window]."""
    if _form(form) == "masked_dense":
        mask = b.constant(local_mask(model, i))
        return b.mul(b.matmul(dz, x, trans_a=True), mask)
    geo = geometry(model, i)
    blocks = [b.matmul(_unit_block(b, dz, 1, loc, geo), p, trans_a=True) for loc, p in enumerate(patches(b, x, geo))]
    return b.concat(blocks, axis=0)
