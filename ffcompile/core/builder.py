"""Builds tensor programs. Each method is one primitive: its shape rule lives here, its meaning in
the torch backend (the reference), and its lowering in each other backend.

Values are referred to by ``Value``; names are scoped (``h1/norm/sqrt_12``) so that emitted graphs
read well in Netron and parity reports point at a layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np

from .program import Node, Program, Value

PRIMITIVES = (
    "identity", "matmul", "add", "sub", "mul", "div", "neg", "maximum", "minimum",
    "relu", "sigmoid", "exp", "log", "sqrt", "abs", "step",
    "reduce_sum", "reduce_max", "reshape", "transpose", "concat", "slice",
    "less", "equal", "where", "cast", "cumsum", "argmax", "one_hot", "constant",
)


def broadcast_shapes(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(np.broadcast_shapes(a, b))


class Builder:
    def __init__(self, name: str):
        self.name = name
        self._inputs: list[Value] = []
        self._outputs: list[Value] = []
        self._nodes: list[Node] = []
        self._constants: dict[str, np.ndarray] = {}
        self._scope: list[str] = []
        self._taken: set[str] = set()
        self._counter = 0

    # -- naming -------------------------------------------------------------------------
    @contextlib.contextmanager
    def scope(self, name: str):
        self._scope.append(name)
        try:
            yield
        finally:
            self._scope.pop()

    def _fresh(self, hint: str) -> str:
        self._counter += 1
        return "/".join([*self._scope, f"{hint}_{self._counter}"])

    def _claim(self, name: str) -> str:
        if name in self._taken:
            raise ValueError(f"program {self.name}: duplicate value name {name!r}")
        self._taken.add(name)
        return name

    def _emit(self, op: str, inputs: Sequence[Value], shape, dtype="float32", name=None, **attrs) -> Value:
        out = Value(self._claim(name or self._fresh(op)), tuple(int(d) for d in shape), dtype)
        self._nodes.append(Node(op, tuple(v.name for v in inputs), out, attrs))
        return out

    # -- graph boundary -----------------------------------------------------------------
    def input(self, name: str, shape, dtype="float32") -> Value:
        value = Value(self._claim(name), tuple(int(d) for d in shape), dtype)
        self._inputs.append(value)
        return value

    def output(self, name: str, value: Value) -> Value:
        out = self._emit("identity", [value], value.shape, value.dtype, name=name)
        self._outputs.append(out)
        return out

    def constant(self, array, dtype="float32") -> Value:
        array = np.asarray(array, dtype=dtype)
        out = self._emit("constant", [], array.shape, dtype)
        self._constants[out.name] = array
        return out

    def scalar(self, x: float) -> Value:
        return self.constant(np.float32(x))

    def build(self) -> Program:
        """The finished program; inputs that no node reads are dropped (e.g. the softmax readout's
        weights in ``infer_goodness``), so every backend sees the same, minimal signature."""
        used = {name for node in self._nodes for name in node.inputs}
        inputs = [v for v in self._inputs if v.name in used]
        return Program(self.name, inputs, list(self._nodes), list(self._outputs), dict(self._constants))

    # -- primitives -----------------------------------------------------------------------
    def matmul(self, a: Value, b: Value, trans_a=False, trans_b=False) -> Value:
        """2-D matrix product op(a) @ op(b), op = transpose where asked."""
        (m, k1) = a.shape[::-1] if trans_a else a.shape
        (k2, n) = b.shape[::-1] if trans_b else b.shape
        if k1 != k2:
            raise ValueError(f"matmul: inner dimensions differ: {a.shape} x {b.shape} (trans {trans_a}, {trans_b})")
        return self._emit("matmul", [a, b], (m, n), trans_a=trans_a, trans_b=trans_b)

    def _binary(self, op, a, b) -> Value:
        a, b = self._lift(a), self._lift(b)
        return self._emit(op, [a, b], broadcast_shapes(a.shape, b.shape), a.dtype)

    def _lift(self, x) -> Value:
        return x if isinstance(x, Value) else self.scalar(x)

    def add(self, a, b): return self._binary("add", a, b)
    def sub(self, a, b): return self._binary("sub", a, b)
    def mul(self, a, b): return self._binary("mul", a, b)
    def div(self, a, b): return self._binary("div", a, b)
    def maximum(self, a, b): return self._binary("maximum", a, b)
    def minimum(self, a, b): return self._binary("minimum", a, b)

    def _unary(self, op, x: Value) -> Value:
        return self._emit(op, [x], x.shape, x.dtype)

    def identity(self, x): return self._unary("identity", x)
    def neg(self, x): return self._unary("neg", x)
    def relu(self, x): return self._unary("relu", x)
    def sigmoid(self, x): return self._unary("sigmoid", x)
    def exp(self, x): return self._unary("exp", x)
    def log(self, x): return self._unary("log", x)
    def sqrt(self, x): return self._unary("sqrt", x)
    def abs(self, x): return self._unary("abs", x)

    def step(self, x: Value) -> Value:
        """Heaviside step as float: 1 where x > 0 else 0 (the ReLU derivative)."""
        return self._unary("step", x)

    def _reduced(self, shape, axes, keepdims):
        axes = tuple(a % len(shape) for a in axes)
        return tuple((1 if keepdims else None) if i in axes else d for i, d in enumerate(shape)), axes

    def reduce_sum(self, x: Value, axes: Sequence[int], keepdims=False) -> Value:
        shape, axes = self._reduced(x.shape, axes, keepdims)
        return self._emit("reduce_sum", [x], [d for d in shape if d is not None], x.dtype, axes=axes, keepdims=keepdims)

    def reduce_max(self, x: Value, axes: Sequence[int], keepdims=False) -> Value:
        shape, axes = self._reduced(x.shape, axes, keepdims)
        return self._emit("reduce_max", [x], [d for d in shape if d is not None], x.dtype, axes=axes, keepdims=keepdims)

    def reduce_mean(self, x: Value, axes: Sequence[int], keepdims=False) -> Value:
        count = int(np.prod([x.shape[a] for a in axes]))
        return self.mul(self.reduce_sum(x, axes, keepdims), 1.0 / count)

    def reshape(self, x: Value, shape: Sequence[int]) -> Value:
        if int(np.prod(shape)) != int(np.prod(x.shape)):
            raise ValueError(f"reshape: {x.shape} cannot become {tuple(shape)}")
        return self._emit("reshape", [x], shape, x.dtype, new_shape=tuple(shape))

    def transpose(self, x: Value, perm: Sequence[int]) -> Value:
        return self._emit("transpose", [x], [x.shape[p] for p in perm], x.dtype, perm=tuple(perm))

    def concat(self, xs: Sequence[Value], axis: int) -> Value:
        axis %= len(xs[0].shape)
        shape = list(xs[0].shape)
        shape[axis] = sum(x.shape[axis] for x in xs)
        return self._emit("concat", list(xs), shape, xs[0].dtype, axis=axis)

    def slice(self, x: Value, axis: int, start: int, stop: int) -> Value:
        axis %= len(x.shape)
        if not 0 <= start < stop <= x.shape[axis]:
            raise ValueError(f"slice: [{start}:{stop}] out of range for axis {axis} of {x.shape}")
        shape = list(x.shape)
        shape[axis] = stop - start
        return self._emit("slice", [x], shape, x.dtype, axis=axis, start=start, stop=stop)

    def less(self, a, b) -> Value:
        a, b = self._lift(a), self._lift(b)
        return self._emit("less", [a, b], broadcast_shapes(a.shape, b.shape), "bool")

    def equal(self, a: Value, b: Value) -> Value:
        return self._emit("equal", [a, b], broadcast_shapes(a.shape, b.shape), "bool")

    def where(self, cond: Value, a, b) -> Value:
        a, b = self._lift(a), self._lift(b)
        shape = broadcast_shapes(cond.shape, broadcast_shapes(a.shape, b.shape))
        return self._emit("where", [cond, a, b], shape, a.dtype)

    def cast(self, x: Value, dtype: str) -> Value:
        return self._emit("cast", [x], x.shape, dtype, to=dtype)

    def cumsum(self, x: Value, axis: int) -> Value:
        return self._emit("cumsum", [x], x.shape, x.dtype, axis=axis % len(x.shape))

    def argmax(self, x: Value, axis: int) -> Value:
        """Index of the first maximum along axis (ties -> lowest index), int64, axis removed."""
        axis %= len(x.shape)
        shape = [d for i, d in enumerate(x.shape) if i != axis]
        return self._emit("argmax", [x], shape, "int64", axis=axis)

    def one_hot(self, indices: Value, depth: int) -> Value:
        """float32 one-hot rows: indices [...] int64 -> [..., depth]."""
        return self._emit("one_hot", [indices], [*indices.shape, depth], "float32", depth=depth)
