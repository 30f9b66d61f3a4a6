"""Bounds on a spec's sizes and counts, checked with the rest of the spec (``spec.validate``): a
value past a cap would make ``inspect``, ``build`` or a training step run for hours or exhaust
memory before anything could say why. Each message names the cap and the reason for it."""

from __future__ import annotations

import dataclasses
import math
import re

MAX_UNITS = 1 << 20  # units in the input or in one layer
MAX_PARAMS = 1 << 30  # parameters in all: 4 GiB of float32, and Adam keeps two more copies
MAX_LAYERS = 64
MAX_GRID = 64  # locations per side of a local layer: each is its own block of the compiled program
MAX_FIELD = 64
MAX_CLASSES = 1 << 16
MAX_BATCH = 1 << 16
MAX_EPOCHS = 1 << 20
MAX_SEED = (1 << 63) - 1
MAX_ITERATIONS = 64  # recurrent iterations, each unrolled into the compiled programs
MAX_BLUR_PASSES = 64  # hybrid-negative mask blur passes, each unrolled into the train step
RESERVED_LAYER_NAMES = ("softmax",)  # the softmax readout's parameters are softmax.weight / softmax.bias
_LAYER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")


def check_layer_name(name: str, where: str, fail) -> None:
    if _LAYER_NAME.fullmatch(name) is None:
        fail(f"{where}.name", "must be 1 to 64 letters, digits, '_' or '-', starting with a letter or '_' "
                              f"(it names the layer's tensors), got {name[:80]!r}")
    if name in RESERVED_LAYER_NAMES:
        fail(f"{where}.name", f"{name!r} is reserved for the softmax readout's parameters")


def check_finite(value, where: str, fail) -> None:
    """Every float field, however deep, is a finite number (NaN passes most range checks)."""
    if dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            check_finite(getattr(value, f.name), f"{where}.{f.name}" if where else f.name, fail)
    elif isinstance(value, tuple):
        for i, item in enumerate(value):
            check_finite(item, f"{where}[{i}]", fail)
    elif isinstance(value, float) and not math.isfinite(value):
        fail(where, f"must be a finite number, got {value}")


def check_limits(model, fail) -> None:
    """``fail(where, message)`` raises; called after the fields' own checks."""
    check_finite(model, "", fail)

    def at_most(where: str, value: int, cap: int, why: str) -> None:
        if value > cap:
            fail(where, f"must be at most {cap}, got {value} ({why})")

    inp = model.input
    if any(d <= 0 for d in inp.image_shape):
        fail("input.image_shape", f"sides must be positive, got {list(inp.image_shape)}")
    at_most("input.size", inp.size, MAX_UNITS, "larger inputs do not fit the compiled programs' memory")
    at_most("input.label.classes", inp.label.classes, MAX_CLASSES, "one program input per class")
    at_most("layers", len(model.layers), MAX_LAYERS, "every layer is a stage of every compiled program")
    for i, layer in enumerate(model.layers):
        where = f"layers[{i}] ({layer.name})"
        at_most(f"{where}.size", layer.size, MAX_UNITS, "the layer's weights would not fit in memory")
        if layer.kind == "local":
            at_most(f"{where}.grid", layer.grid, MAX_GRID, "each location is its own block of the compiled program")
            at_most(f"{where}.field", layer.field, MAX_FIELD, "wider windows are dense layers")
    params = _parameter_count(model)
    at_most("layers", params, MAX_PARAMS,
            "parameters in all (4 GiB of float32; the optimizer keeps more copies of them)")

    t = model.training
    at_most("training.batch_size", t.batch_size, MAX_BATCH, "the compiled programs hold a whole batch at once")
    at_most("training.epochs", t.epochs, MAX_EPOCHS, "a run would never end")
    if not 0 <= t.seed <= MAX_SEED:
        fail("training.seed", f"must be in 0..{MAX_SEED}, got {t.seed}")
    at_most("training.jitter", t.jitter, min(inp.image_shape) // 2, "a shift by half the image or more leaves nothing")
    neg = model.negatives
    if neg.blur_passes < 0:
        fail("negatives.blur_passes", f"must be >= 0, got {neg.blur_passes}")
    at_most("negatives.blur_passes", neg.blur_passes, MAX_BLUR_PASSES, "each pass is unrolled into the train step")
    if not 0 < neg.min_prob < 1:
        fail("negatives.min_prob", f"must be in (0, 1), got {neg.min_prob}")
    if model.recurrent is not None:
        at_most("recurrent.iterations", model.recurrent.iterations, MAX_ITERATIONS,
                "each iteration is unrolled into the compiled programs")
    opt = model.optimizer
    if opt.eps <= 0:
        fail("optimizer.eps", f"must be > 0 (it keeps Adam's update from dividing by zero), got {opt.eps}")
    if opt.kind == "adam":
        for name in ("beta1", "beta2"):
            if not 0 < getattr(opt, name) < 1:
                fail(f"optimizer.{name}", f"must be in (0, 1) for adam (its bias correction is 1 - {name}^step, "
                                          f"computed from log({name})), got {getattr(opt, name)}")


def _parameter_count(model) -> int:
    """Weights and biases, counted from the sizes alone (before any shape is built)."""
    total = 0
    for i, layer in enumerate(model.layers):
        if layer.kind == "local":
            in_channels = model.input.channels if i == 0 else getattr(model.layers[i - 1], "channels", 1)
            total += layer.size * layer.field * layer.field * in_channels
        else:
            total += layer.size * model.fan_in(i)
        total += layer.size
    return total
