"""The primitives of tensor programs, one entry each: its shape rule, its meaning (the reference,
written against torch), its ONNX lowering and its hints for backends. Adding a primitive is one
``@primitive`` entry here (and its case in tests/compiler/test_onnx_emit.py); the builder
(``b.name(...)``), the torch interpreter and the ONNX emitter all read this table.

- **shape rule** (the decorated function): ``rule(b, *args, **kwargs) -> Emit``: checks the
  arguments and says which values the node reads, its output shape and dtype, and its attributes.
  ``b.lift(x)`` turns a Python number into a scalar constant.
- **reference**: ``reference(torch, *inputs, **attrs) -> tensor``. This is the definition of what the
  primitive computes; every other backend is checked against it. ``torch`` is passed in, so this
  module (and everything that goes onto devices) never imports it.
- **onnx**: ``onnx(g, inputs, output, **attrs)`` adds standard ONNX ops (opset 18) to ``g``:
  ``g.node(op_type, inputs, output_name, **attrs)``, ``g.const(name, array)`` and
  ``g.onnx_type(dtype)``. ``onnx_op("Relu")`` is the lowering to one ONNX op of the same inputs.
- **elementwise**: computed independently per element, with numpy broadcasting: the ONNX emitter
  may run chains of such nodes tile by tile.

``constant`` is made by ``Builder.constant`` (its value lives in the program's constants) and
becomes an ONNX initializer; it has no rule, reference or lowering of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from .program import Value


class Emit(NamedTuple):
    inputs: tuple[Value, ...]
    shape: tuple[int, ...]
    dtype: str
    attrs: dict


def emit(inputs: Sequence[Value], shape, dtype: str, **attrs) -> Emit:
    return Emit(tuple(inputs), tuple(int(d) for d in shape), dtype, attrs)


@dataclass(frozen=True)
class Primitive:
    name: str
    rule: Callable | None
    reference: Callable | None
    onnx: Callable | None
    elementwise: bool = False
    doc: str = field(default="", compare=False)


PRIMITIVES: dict[str, Primitive] = {}


def primitive(name: str, *, reference: Callable, onnx: Callable, elementwise: bool = False):
    """Register the decorated shape rule as primitive ``name``."""
    def register(rule: Callable) -> Callable:
        if name in PRIMITIVES:
            raise ValueError(f"primitive {name!r} is registered twice")
        PRIMITIVES[name] = Primitive(name, rule, reference, onnx, elementwise, (rule.__doc__ or "").strip())
        return rule
    return register


def onnx_op(op_type: str) -> Callable:
    """The lowering to one ONNX op that takes the primitive's inputs as they are."""
    def lower(g, ins, out, **_):
        g.node(op_type, ins, out)
    return lower


def broadcast_shapes(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(np.broadcast_shapes(a, b))


PRIMITIVES["constant"] = Primitive("constant", None, None, None, doc="A constant array (``Builder.constant``).")


# -- elementwise ------------------------------------------------------------------------------

def _unary(name: str, reference: Callable, op_type: str, doc: str) -> None:
    def rule(b, x: Value) -> Emit:
        return emit([x], x.shape, x.dtype)
    rule.__doc__ = doc
    primitive(name, reference=reference, onnx=onnx_op(op_type), elementwise=True)(rule)


def _binary(name: str, reference: Callable, op_type: str, doc: str) -> None:
    def rule(b, x, y) -> Emit:
        x, y = b.lift(x), b.lift(y)
        return emit([x, y], broadcast_shapes(x.shape, y.shape), x.dtype)
    rule.__doc__ = doc
    primitive(name, reference=reference, onnx=onnx_op(op_type), elementwise=True)(rule)


_unary("identity", lambda torch, x: x, "Identity", "x (a copy; names program outputs)")
_unary("neg", lambda torch, x: torch.neg(x), "Neg", "-x")
_unary("relu", lambda torch, x: torch.relu(x), "Relu", "max(x, 0)")
_unary("exp", lambda torch, x: torch.exp(x), "Exp", "e ** x")
_unary("log", lambda torch, x: torch.log(x), "Log", "natural logarithm")
_unary("sqrt", lambda torch, x: torch.sqrt(x), "Sqrt", "square root")
_unary("abs", lambda torch, x: torch.abs(x), "Abs", "|x|")
_unary("tanh", lambda torch, x: torch.tanh(x), "Tanh", "hyperbolic tangent")
_binary("add", lambda torch, x, y: torch.add(x, y), "Add", "x + y (broadcasting)")
_binary("sub", lambda torch, x, y: torch.sub(x, y), "Sub", "x - y (broadcasting)")
_binary("mul", lambda torch, x, y: torch.mul(x, y), "Mul", "x * y (broadcasting)")
_binary("div", lambda torch, x, y: torch.div(x, y), "Div", "x / y (broadcasting)")
_binary("maximum", lambda torch, x, y: torch.maximum(x, y), "Max", "elementwise max (broadcasting)")
_binary("minimum", lambda torch, x, y: torch.minimum(x, y), "Min", "elementwise min (broadcasting)")


def _sigmoid_onnx(g, ins, out):
    # not onnxruntime's Sigmoid: 17 % off at -15 and 0 below -20, where a saturated FF logit's
    # gradient lives; from exp(-|x|) it keeps its relative precision on both sides
    e = g.node("Exp", [g.node("Neg", [g.node("Abs", ins, f"{out}/abs")], f"{out}/neg_abs")], f"{out}/exp")
    one = g.const(f"{out}/one", np.float32(1))
    d = g.node("Add", [e, one], f"{out}/denominator")
    below = g.node("Less", [ins[0], g.const(f"{out}/zero", np.float32(0))], f"{out}/below_zero")
    g.node("Where", [below, g.node("Div", [e, d], f"{out}/left_tail"), g.node("Div", [one, d], f"{out}/right_tail")], out)


@primitive("sigmoid", reference=lambda torch, x: torch.sigmoid(x), onnx=_sigmoid_onnx)
def _sigmoid(b, x: Value) -> Emit:
    """1 / (1 + e ** -x), accurate in both tails"""
    return emit([x], x.shape, x.dtype)


def _step_onnx(g, ins, out):
    positive = g.node("Greater", [ins[0], g.const(f"{out}/zero", np.float32(0))], f"{out}/positive")
    g.node("Cast", [positive], out, to=g.onnx_type("float32"))


@primitive("step", reference=lambda torch, x: (x > 0).to(x.dtype), onnx=_step_onnx, elementwise=True)
def _step(b, x: Value) -> Emit:
    """Heaviside step as float: 1 where x > 0 else 0 (the ReLU derivative)"""
    return emit([x], x.shape, x.dtype)


@primitive("less", reference=lambda torch, x, y: torch.lt(x, y), onnx=onnx_op("Less"), elementwise=True)
def _less(b, x, y) -> Emit:
    """x < y as bool (broadcasting)"""
    x, y = b.lift(x), b.lift(y)
    return emit([x, y], broadcast_shapes(x.shape, y.shape), "bool")


@primitive("equal", reference=lambda torch, x, y: torch.eq(x, y), onnx=onnx_op("Equal"), elementwise=True)
def _equal(b, x: Value, y: Value) -> Emit:
    """x == y as bool (broadcasting)"""
    return emit([x, y], broadcast_shapes(x.shape, y.shape), "bool")


@primitive("where", reference=lambda torch, c, x, y: torch.where(c, x, y), onnx=onnx_op("Where"), elementwise=True)
def _where(b, cond: Value, x, y) -> Emit:
    """x where cond else y (broadcasting)"""
    x, y = b.lift(x), b.lift(y)
    return emit([cond, x, y], broadcast_shapes(cond.shape, broadcast_shapes(x.shape, y.shape)), x.dtype)


_TORCH_DTYPES = ("float32", "int64", "bool")


@primitive("cast", reference=lambda torch, x, to: x.to(getattr(torch, to)),
           onnx=lambda g, ins, out, to: g.node("Cast", ins, out, to=g.onnx_type(to)), elementwise=True)
def _cast(b, x: Value, dtype: str) -> Emit:
    """x converted to ``dtype`` (float32, int64 or bool)"""
    if dtype not in _TORCH_DTYPES:
        raise ValueError(f"cast: unknown dtype {dtype!r} (known: {', '.join(_TORCH_DTYPES)})")
    return emit([x], x.shape, dtype, to=dtype)


# -- linear algebra, reductions and layout ------------------------------------------------------

@primitive("matmul", reference=lambda torch, a, b, trans_a, trans_b: (a.T if trans_a else a) @ (b.T if trans_b else b),
           onnx=lambda g, ins, out, trans_a, trans_b: g.node("Gemm", ins, out, transA=int(trans_a), transB=int(trans_b)))
def _matmul(b, x: Value, y: Value, trans_a=False, trans_b=False) -> Emit:
    """2-D matrix product op(x) @ op(y), op = transpose where asked"""
    (m, k1) = x.shape[::-1] if trans_a else x.shape
    (k2, n) = y.shape[::-1] if trans_b else y.shape
    if k1 != k2:
        raise ValueError(f"matmul: inner dimensions differ: {x.shape} x {y.shape} (trans {trans_a}, {trans_b})")
    return emit([x, y], (m, n), x.dtype, trans_a=trans_a, trans_b=trans_b)


def _reduce_rule(x: Value, axes: Sequence[int], keepdims: bool) -> Emit:
    axes = tuple(a % len(x.shape) for a in axes)
    shape = [1 if i in axes else d for i, d in enumerate(x.shape) if keepdims or i not in axes]
    return emit([x], shape, x.dtype, axes=axes, keepdims=keepdims)


def _reduce_reference(reduce: str) -> Callable:
    def run(torch, x, axes, keepdims):
        for axis in sorted(axes, reverse=True):
            x = getattr(torch, reduce)(x, dim=axis, keepdim=keepdims)
        return x
    return run


def _reduce_onnx(op_type: str) -> Callable:
    def lower(g, ins, out, axes, keepdims):
        g.node(op_type, [ins[0], g.const(f"{out}/axes", np.array(axes, np.int64))], out, keepdims=int(keepdims))
    return lower


@primitive("reduce_sum", reference=_reduce_reference("sum"), onnx=_reduce_onnx("ReduceSum"))
def _reduce_sum(b, x: Value, axes: Sequence[int], keepdims=False) -> Emit:
    """sum over ``axes``"""
    return _reduce_rule(x, axes, keepdims)


@primitive("reduce_max", reference=_reduce_reference("amax"), onnx=_reduce_onnx("ReduceMax"))
def _reduce_max(b, x: Value, axes: Sequence[int], keepdims=False) -> Emit:
    """maximum over ``axes``"""
    return _reduce_rule(x, axes, keepdims)


@primitive("reshape", reference=lambda torch, x, new_shape: torch.reshape(x, new_shape),
           onnx=lambda g, ins, out, new_shape: g.node(
               "Reshape", [ins[0], g.const(f"{out}/shape", np.array(new_shape, np.int64))], out))
def _reshape(b, x: Value, shape: Sequence[int]) -> Emit:
    """the same values in row-major order, in ``shape``; one entry may be -1 (whatever is left),
    and stays -1 in the emitted graph, so a leading -1 keeps the batch free there"""
    shape = tuple(shape)
    known = int(np.prod([d for d in shape if d != -1]))
    size = int(np.prod(x.shape))
    if shape.count(-1) > 1 or known <= 0 or size % known or (-1 not in shape and known != size):
        raise ValueError(f"reshape: {x.shape} cannot become {shape}")
    static = tuple(size // known if d == -1 else d for d in shape)
    return emit([x], static, x.dtype, new_shape=shape)


@primitive("transpose", reference=lambda torch, x, perm: x.permute(*perm),
           onnx=lambda g, ins, out, perm: g.node("Transpose", ins, out, perm=list(perm)))
def _transpose(b, x: Value, perm: Sequence[int]) -> Emit:
    """axes permuted: output axis i is input axis perm[i]"""
    return emit([x], [x.shape[p] for p in perm], x.dtype, perm=tuple(perm))


@primitive("concat", reference=lambda torch, *xs, axis: torch.cat(xs, dim=axis),
           onnx=lambda g, ins, out, axis: g.node("Concat", ins, out, axis=axis))
def _concat(b, xs: Sequence[Value], axis: int) -> Emit:
    """``xs`` joined along ``axis``"""
    axis %= len(xs[0].shape)
    shape = list(xs[0].shape)
    shape[axis] = sum(x.shape[axis] for x in xs)
    return emit(xs, shape, xs[0].dtype, axis=axis)


def _slice_onnx(g, ins, out, axis, start, stop):
    g.node("Slice", [ins[0], g.const(f"{out}/starts", np.array([start], np.int64)),
                     g.const(f"{out}/ends", np.array([stop], np.int64)),
                     g.const(f"{out}/axes", np.array([axis], np.int64))], out)


@primitive("slice", reference=lambda torch, x, axis, start, stop: torch.narrow(x, axis, start, stop - start),
           onnx=_slice_onnx)
def _slice(b, x: Value, axis: int, start: int, stop: int) -> Emit:
    """x[start:stop] along ``axis``"""
    axis %= len(x.shape)
    if not 0 <= start < stop <= x.shape[axis]:
        raise ValueError(f"slice: [{start}:{stop}] out of range for axis {axis} of {x.shape}")
    shape = list(x.shape)
    shape[axis] = stop - start
    return emit([x], shape, x.dtype, axis=axis, start=start, stop=stop)


@primitive("cumsum", reference=lambda torch, x, axis: torch.cumsum(x, dim=axis),
           onnx=lambda g, ins, out, axis: g.node(
               "CumSum", [ins[0], g.const(f"{out}/axis", np.array(axis, np.int64))], out))
def _cumsum(b, x: Value, axis: int) -> Emit:
    """running sum along ``axis``"""
    return emit([x], x.shape, x.dtype, axis=axis % len(x.shape))


# torch.argmax picks the first maximum on CPU and CUDA; ONNX ArgMax with select_last_index=0 too.
@primitive("argmax", reference=lambda torch, x, axis: torch.argmax(x, dim=axis),
           onnx=lambda g, ins, out, axis: g.node("ArgMax", ins, out, axis=axis, keepdims=0, select_last_index=0))
def _argmax(b, x: Value, axis: int) -> Emit:
    """index of the first maximum along ``axis`` (ties -> lowest index), int64, axis removed"""
    axis %= len(x.shape)
    return emit([x], [d for i, d in enumerate(x.shape) if i != axis], "int64", axis=axis)


def _one_hot_onnx(g, ins, out, depth):
    column = g.node("Unsqueeze", [ins[0], g.const(f"{out}/axis", np.array([-1], np.int64))], f"{out}/column")
    hit = g.node("Equal", [column, g.const(f"{out}/classes", np.arange(depth, dtype=np.int64))], f"{out}/hit")
    g.node("Cast", [hit], out, to=g.onnx_type("float32"))


# not F.one_hot: it validates indices with a host sync, which CUDA graph capture forbids
@primitive("one_hot", reference=lambda torch, idx, depth: (
               idx.unsqueeze(-1) == torch.arange(depth, device=idx.device)).to(torch.float32),
           onnx=_one_hot_onnx)
def _one_hot(b, indices: Value, depth: int) -> Emit:
    """float32 one-hot rows: indices [...] int64 -> [..., depth]"""
    return emit([indices], [*indices.shape, depth], "float32", depth=depth)
