"""Locally connected layers without weight sharing (footnote 8).

Unit order within a layer is (grid_y, grid_x, channel). A unit at grid point (gy, gx) sees a
``field`` x ``field`` window whose top-left corner is (gy * stride - padding, gx * stride -
padding) in the layer below: pixels of the input image (every colour channel) for the first
layer, grid points (all their channels) for later ones. Window inputs are ordered (dy, dx,
channel). Positions in the padding are zeros: windows at the edge are truncated (footnote 12).
The input image is stored as channel planes (CIFAR-10's R, G, B 32x32 planes one after
another); hidden layers as (y, x, channel).

A ``Geometry`` describes one such connection. Besides a layer's bottom-up input
(``geometry``), a recurrent net (sec. 3.4, 4) connects a local layer to the local layer above
(``top_down_geometry``): the same window shape, around the same grid point.

Two equivalent lowerings:

- **masked dense** (footnote 13, the definition): the weight is a dense [out, in] matrix with a
  constant 0/1 connectivity mask. It stays exactly zero off the mask: those weights start at 0
  and every gradient (local rule, peer normalization) is multiplied by the mask, so weight decay,
  momentum and Adam slots stay 0 there too.
- **blocked**: the weight is stored compactly as [out, field * field * channels below], one row
  per unit holding only its receptive field (entries that fall in the padding start at 0 and
  stay 0: their inputs are zeros, so their gradient is). Each grid location gathers its window
  with slices and runs one small matmul (forward and weight gradient).

Which one a connection gets follows from its geometry (``form``), so a model's parameter shapes
never depend on anything else: blocked up to ``BLOCKED_MAX_LOCATIONS`` grid locations, masked
dense above. Blocked is faster wherever the grid is small (``python bench/bench_local.py``, the
paper's MNIST sizes, batch 100): the whole train step of models/mnist-local.toml (16, 9 and 4
locations) takes ~0.45 s vs ~1.9 s with the torch backend and ~0.14 s vs ~0.65 s with onnxruntime
on 1 CPU thread. But it emits ~4 ops per location and use:
CIFAR-10's 32x32 maps (1024 locations, sec. 4) would make the recurrent train step of
models/cifar-local-3.toml a program of 571,468 nodes (masked dense: 2,622), too large to compile
or to launch kernel by kernel, while its dense matmuls (88 % zeros) are what a GPU does best —
the way footnote 13 says the paper ran them.

``dense_weight`` / ``compact_weight`` convert between the two layouts; ``lowering_form``
forces one form everywhere (benchmarks and the equivalence tests).
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from dataclasses import dataclass

import numpy as np

from ..core.builder import Builder
from ..core.program import Value
from ..core.spec import LocalLayer, Model

FORMS = ("blocked", "masked_dense")
BLOCKED_MAX_LOCATIONS = 64
LOWERING: str | None = None  # None: each connection's form follows from its geometry (``form``)


@contextlib.contextmanager
def lowering_form(form: str):
    """Build programs and initial state with every local connection in ``form`` inside the block."""
    global LOWERING
    if form not in FORMS:
        raise ValueError(f"unknown local-layer form {form!r} (known: {', '.join(FORMS)})")
    saved, LOWERING = LOWERING, form
    try:
        yield
    finally:
        LOWERING = saved


@dataclass(frozen=True)
class Geometry:
    """Where a local layer's units look in the layer below it (or above, for top-down input): a
    side x side map of ``below_channels``, stored as channel planes if ``planar``."""

    side: int
    below_channels: int
    grid: int
    field: int
    stride: int
    channels: int
    padding: int = 0
    planar: bool = False

    @property
    def locations(self) -> int:
        return self.grid * self.grid

    @property
    def units(self) -> int:
        return self.locations * self.channels

    @property
    def window(self) -> int:
        """Inputs of one unit: field * field * channels below (padding included)."""
        return self.field * self.field * self.below_channels

    @property
    def dense_fan_in(self) -> int:
        return self.side * self.side * self.below_channels

    def origins(self) -> list[tuple[int, int]]:
        """Top-left window corners in the padded map."""
        return [(gy * self.stride, gx * self.stride) for gy in range(self.grid) for gx in range(self.grid)]

    def window_indices(self) -> np.ndarray:
        """[locations, window] indices into the layer below's flattened vector; -1 in the padding."""
        dy, dx, c = np.meshgrid(np.arange(self.field), np.arange(self.field), np.arange(self.below_channels),
                                indexing="ij")
        dy, dx, c = dy.ravel(), dx.ravel(), c.ravel()
        out = []
        for oy, ox in self.origins():
            y, x = oy + dy - self.padding, ox + dx - self.padding
            inside = (y >= 0) & (y < self.side) & (x >= 0) & (x < self.side)
            flat = (c * self.side + y) * self.side + x if self.planar else (y * self.side + x) * self.below_channels + c
            out.append(np.where(inside, flat, -1))
        return np.array(out)


def geometry(model: Model, i: int) -> Geometry:
    """Layer i's bottom-up connection."""
    layer = model.layers[i]
    if not isinstance(layer, LocalLayer):
        raise TypeError(f"layer {layer.name!r} is not a local layer")
    if i == 0:
        side, below_channels, planar = model.input.image_shape[0], model.input.channels, model.input.channels > 1
    else:
        below = model.layers[i - 1]
        side, below_channels, planar = below.grid, below.channels, False
    return Geometry(side, below_channels, layer.grid, layer.field, layer.stride, layer.channels, layer.padding, planar)


def has_local_top_down(model: Model, i: int) -> bool:
    """Recurrent nets: layer i takes top-down input through windows when it and the layer above are local."""
    return (model.recurrent is not None and i + 1 < len(model.layers)
            and is_local(model, i) and is_local(model, i + 1))


def top_down_geometry(model: Model, i: int) -> Geometry:
    """Local layer i's view of local layer i + 1 (same grid, stride 1, checked by the spec): the
    upper layer's field x field window, padded as it pads, around the same grid point — the
    mirror of the upper layer's bottom-up connection."""
    if not has_local_top_down(model, i):
        raise TypeError(f"layer {model.layers[i].name!r} has no local top-down connection")
    layer, above = model.layers[i], model.layers[i + 1]
    return Geometry(above.grid, above.channels, layer.grid, above.field, 1, layer.channels, above.padding)


def is_local(model: Model, i: int) -> bool:
    return isinstance(model.layers[i], LocalLayer)


def form(geo: Geometry, forced: str | None = None) -> str:
    if forced is not None:
        return forced
    if LOWERING is not None:
        return LOWERING
    return "blocked" if geo.locations <= BLOCKED_MAX_LOCATIONS else "masked_dense"


@functools.lru_cache(maxsize=8)
def _mask(geo: Geometry) -> np.ndarray:
    return mask(geo)


def mask(geo: Geometry) -> np.ndarray:
    """The 0/1 connectivity [out, in]: one row per unit, ones on its window inside the map."""
    out = np.zeros((geo.units, geo.dense_fan_in), np.float32)
    rows = np.arange(geo.units).reshape(geo.locations, geo.channels)
    for loc, cols in enumerate(geo.window_indices()):
        out[np.ix_(rows[loc], cols[cols >= 0])] = 1.0
    return out


def shape(geo: Geometry, forced: str | None = None) -> tuple[int, int]:
    return (geo.units, geo.window if form(geo, forced) == "blocked" else geo.dense_fan_in)


def _unit_columns(geo: Geometry) -> np.ndarray:
    """[out, window]: the dense input index of each compact weight column, per unit (-1: padding)."""
    return np.repeat(geo.window_indices(), geo.channels, axis=0)


def to_dense(geo: Geometry, compact: np.ndarray) -> np.ndarray:
    """Compact [out, window] -> dense [out, in], zero off the receptive fields (and the padding dropped)."""
    cols = _unit_columns(geo)
    dense = np.zeros((compact.shape[0], geo.dense_fan_in + 1), compact.dtype)  # column -1: a bin for the padding
    np.put_along_axis(dense, np.where(cols >= 0, cols, geo.dense_fan_in), compact, axis=1)
    return dense[:, :-1]


def to_compact(geo: Geometry, dense: np.ndarray) -> np.ndarray:
    """Dense [out, in] -> compact [out, window]: whatever lies off the mask is dropped, padding is 0."""
    cols = _unit_columns(geo)
    return np.where(cols >= 0, np.take_along_axis(dense, np.maximum(cols, 0), axis=1), 0).astype(dense.dtype)


def init(geo: Geometry, rng: np.random.Generator, forced: str | None = None) -> np.ndarray:
    """U(-1/sqrt(k), 1/sqrt(k)) with k the window size; zero off the mask and in the padding."""
    bound = 1.0 / np.sqrt(geo.window)
    compact = rng.uniform(-bound, bound, size=(geo.units, geo.window)).astype(np.float32)
    compact *= _unit_columns(geo) >= 0
    return compact if form(geo, forced) == "blocked" else to_dense(geo, compact)


# -- per-layer views (bottom-up connection of layer i) ------------------------------------------

def local_mask(model: Model, i: int) -> np.ndarray:
    return mask(geometry(model, i))


def weight_shape(model: Model, i: int, forced: str | None = None) -> tuple[int, int]:
    return shape(geometry(model, i), forced)


def dense_weight(model: Model, i: int, compact: np.ndarray) -> np.ndarray:
    return to_dense(geometry(model, i), compact)


def compact_weight(model: Model, i: int, dense: np.ndarray) -> np.ndarray:
    return to_compact(geometry(model, i), dense)


def init_weight(model: Model, i: int, rng: np.random.Generator, forced: str | None = None) -> np.ndarray:
    return init(geometry(model, i), rng, forced)


# -- tensor-program pieces ------------------------------------------------------------------

def patches(b: Builder, x: Value, geo: Geometry) -> list[Value]:
    """One [rows, window] value per location: the window's inputs in (dy, dx, channel) order."""
    rows, side, chans, pad = x.shape[0], geo.side, geo.below_channels, geo.padding
    with b.scope("gather"):
        if geo.planar:
            grid = b.transpose(b.reshape(x, [-1, chans, side, side]), [0, 2, 3, 1])
        else:
            grid = b.reshape(x, [-1, side, side, chans])
        if pad:
            rim = b.constant(np.zeros((rows, pad, side, chans), np.float32))
            grid = b.concat([rim, grid, rim], axis=1)
            rim = b.constant(np.zeros((rows, side + 2 * pad, pad, chans), np.float32))
            grid = b.concat([rim, grid, rim], axis=2)
        out = []
        for oy, ox in geo.origins():
            win = b.slice(b.slice(grid, 1, oy, oy + geo.field), 2, ox, ox + geo.field)
            out.append(b.reshape(win, [-1, geo.window]))
        return out


def _unit_block(b: Builder, v: Value, axis: int, loc: int, geo: Geometry) -> Value:
    return b.slice(v, axis, loc * geo.channels, (loc + 1) * geo.channels)


def apply(b: Builder, x: Value, weight: Value, geo: Geometry, forced: str | None = None) -> Value:
    """x through the connection, no bias: [rows, out]."""
    if form(geo, forced) == "masked_dense":
        return b.matmul(x, weight, trans_b=True)
    per_location = [b.matmul(p, _unit_block(b, weight, 0, loc, geo), trans_b=True)
                    for loc, p in enumerate(patches(b, x, geo))]
    return b.concat(per_location, axis=1)


_MASKS: "weakref.WeakKeyDictionary[Builder, dict]" = weakref.WeakKeyDictionary()


def _mask_constant(b: Builder, geo: Geometry) -> Value:
    """One constant per connectivity and program (a recurrent step uses each at every iteration;
    at CIFAR size a mask is 38 MB)."""
    per_program = _MASKS.setdefault(b, {})
    if geo not in per_program:
        per_program[geo] = b.constant(_mask(geo))
    return per_program[geo]


def gradient(b: Builder, dz: Value, x: Value, geo: Geometry, forced: str | None = None) -> Value:
    """dz^T x restricted to the connectivity: [out, in] masked (masked dense) or [out, window]."""
    if form(geo, forced) == "masked_dense":
        return b.mul(b.matmul(dz, x, trans_a=True), _mask_constant(b, geo))
    blocks = [b.matmul(_unit_block(b, dz, 1, loc, geo), p, trans_a=True) for loc, p in enumerate(patches(b, x, geo))]
    return b.concat(blocks, axis=0)


def forward(b: Builder, x: Value, weight: Value, bias: Value, model: Model, i: int, forced: str | None = None) -> Value:
    """Layer i's pre-activation z [rows, out] from its bottom-up input."""
    return b.add(apply(b, x, weight, geometry(model, i), forced), bias)


def weight_gradient(b: Builder, dz: Value, x: Value, model: Model, i: int, forced: str | None = None) -> Value:
    return gradient(b, dz, x, geometry(model, i), forced)
