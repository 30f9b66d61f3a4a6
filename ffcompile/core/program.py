"""The tensor program: a small SSA of primitive ops with static shapes.

Every FF algorithm (local gradients, optimizers, negatives, readouts) is written once, as a
builder of these programs (see ``ffcompile.lowering``). Backends only map primitives
(``ffcompile.core.primitives``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

DTYPES = ("float32", "int64", "bool")


@dataclass(frozen=True)
class Value:
    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class Node:
    op: str
    inputs: tuple[str, ...]
    output: Value
    attrs: dict = field(default_factory=dict)


@dataclass
class Program:
    """A named, static-shape tensor program: inputs -> nodes -> outputs (all single-output nodes)."""

    name: str
    inputs: list[Value]
    nodes: list[Node]
    outputs: list[Value]
    constants: dict[str, np.ndarray]

    def input(self, name: str) -> Value:
        return next(v for v in self.inputs if v.name == name)

    def signature(self) -> dict:
        return {
            "inputs": [v.to_json() for v in self.inputs],
            "outputs": [v.to_json() for v in self.outputs],
        }

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for node in self.nodes:
            counts[node.op] = counts.get(node.op, 0) + 1
        return counts

    def summary(self) -> str:
        return json.dumps({"program": self.name, **self.signature(), "ops": self.op_counts()}, indent=1)
