"""The reference backend: runs a tensor program with PyTorch, one primitive at a time.

This is the definition of every primitive's meaning; other backends are checked against it.
"""

from __future__ import annotations

import numpy as np
import torch

from ..core.program import Program

_DTYPES = {"float32": torch.float32, "int64": torch.int64, "bool": torch.bool}


def _reduce(fn):
    def run(x, axes, keepdims):
        out = x
        for axis in sorted(axes, reverse=True):
            out = fn(out, axis, keepdims)
        return out
    return run


_reduce_sum = _reduce(lambda x, a, k: torch.sum(x, dim=a, keepdim=k))
_reduce_max = _reduce(lambda x, a, k: torch.amax(x, dim=a, keepdim=k))


def _matmul(a, b, trans_a, trans_b):
    return (a.T if trans_a else a) @ (b.T if trans_b else b)


def _slice(x, axis, start, stop):
    return torch.narrow(x, axis, start, stop - start)


def _argmax(x, axis):
    # torch.argmax picks the first maximum on CPU and CUDA; ONNX ArgMax with select_last_index=0 too.
    return torch.argmax(x, dim=axis)


PRIMITIVES = {
    "identity": lambda x: x,
    "matmul": _matmul,
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div,
    "maximum": torch.maximum, "minimum": torch.minimum,
    "neg": torch.neg, "relu": torch.relu, "sigmoid": torch.sigmoid,
    "exp": torch.exp, "log": torch.log,
    "sqrt": torch.sqrt, "abs": torch.abs,
    "step": lambda x: (x > 0).to(x.dtype),
    "reduce_sum": _reduce_sum, "reduce_max": _reduce_max,
    "reshape": lambda x, new_shape: torch.reshape(x, new_shape),
    "transpose": lambda x, perm: x.permute(*perm),
    "concat": lambda *xs, axis: torch.cat(xs, dim=axis),
    "slice": _slice,
    "less": torch.lt, "equal": torch.eq,
    "where": torch.where,
    "cast": lambda x, to: x.to(_DTYPES[to]),
    "cumsum": lambda x, axis: torch.cumsum(x, dim=axis),
    "argmax": _argmax,
    # not F.one_hot: it validates indices with a host sync, which CUDA graph capture forbids
    "one_hot": lambda idx, depth: (idx.unsqueeze(-1) == torch.arange(depth, device=idx.device)).to(torch.float32),
}


class TorchProgram:
    """A program bound to a torch device; ``run`` takes and returns torch tensors by name."""

    def __init__(self, program: Program, device: str | torch.device = "cpu", float_dtype: torch.dtype = torch.float32):
        """``float_dtype``: what the program's float32 values are computed in (torch.float64 for
        parity's float64 evaluation: constants, and values a node makes from non-float inputs,
        such as ``one_hot``, come out in it too)."""
        self.program = program
        self.device = torch.device(device)
        self.float_dtype = float_dtype
        self.constants = {k: self._float(torch.as_tensor(v, device=self.device)) for k, v in program.constants.items()}
        # Each intermediate value is dropped right after the last node that reads it: peak memory
        # is the live set, not every value the program makes (at paper sizes, tens of GB).
        keep = {v.name for v in program.outputs}
        last_use: dict[str, int] = {}
        for index, node in enumerate(program.nodes):
            for name in node.inputs:
                last_use[name] = index
        self.release: dict[int, list[str]] = {}
        for name, index in last_use.items():
            if name not in keep:
                self.release.setdefault(index, []).append(name)

    def _float(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.float_dtype) if t.is_floating_point() and t.dtype != self.float_dtype else t

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        env = {}
        for value in self.program.inputs:
            if value.name not in feeds:
                raise KeyError(f"{self.program.name}: missing input {value.name!r}")
            env[value.name] = feeds[value.name]
        for index, node in enumerate(self.program.nodes):
            if node.op == "constant":
                env[node.output.name] = self.constants[node.output.name]
                continue
            out = PRIMITIVES[node.op](*(env[n] for n in node.inputs), **node.attrs)
            env[node.output.name] = out if self.float_dtype is torch.float32 else self._float(out)
            for name in self.release.get(index, ()):
                del env[name]
        return {v.name: env[v.name] for v in self.program.outputs}

    def run_numpy(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tensors = {k: torch.as_tensor(np.asarray(v), device=self.device) for k, v in feeds.items()}
        with torch.no_grad():
            out = self.run(tensors)
        return {k: v.cpu().numpy() for k, v in out.items()}
