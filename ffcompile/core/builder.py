"""Builds tensor programs: ``b.<primitive>(...)`` adds one node of a primitive of
``ffcompile.core.primitives`` (which holds its shape rule, meaning and lowerings).

Values are referred to by ``Value``; names are scoped (``h1/norm/sqrt_12``) so that emitted graphs
read well in Netron and parity reports point at a layer.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence

import numpy as np

from .primitives import PRIMITIVES, Primitive
from .program import Node, Program, Value


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

    # -- primitives (ffcompile.core.primitives): ``b.add(x, y)``, ``b.matmul(a, w, trans_b=True)``, ...
    def __getattr__(self, name: str):
        if name not in PRIMITIVES or PRIMITIVES[name].rule is None:
            raise AttributeError(f"Builder has no primitive or method {name!r}")
        return functools.partial(self.apply, PRIMITIVES[name])

    def apply(self, primitive: Primitive, *args, **kwargs) -> Value:
        """One node of ``primitive``: its shape rule checks the arguments and shapes the output."""
        out = primitive.rule(self, *args, **kwargs)
        return self._emit(primitive.name, out.inputs, out.shape, out.dtype, **out.attrs)

    def lift(self, x) -> Value:
        """A value as it is; a Python number as a float32 scalar constant."""
        return x if isinstance(x, Value) else self.scalar(x)

    def reduce_mean(self, x: Value, axes: Sequence[int], keepdims=False) -> Value:
        count = int(np.prod([x.shape[a] for a in axes]))
        return self.mul(self.reduce_sum(x, axes, keepdims), 1.0 / count)
