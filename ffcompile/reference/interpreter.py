"""The reference backend: runs a tensor program with PyTorch, one primitive at a time, each by
its reference meaning in ``ffcompile.core.primitives``; other backends are checked against it.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..core.primitives import PRIMITIVES
from ..core.program import Program

class TorchProgram:
    """A program bound to a torch device; ``run`` takes and returns torch tensors by name."""

    def __init__(self, program: Program, device: str | torch.device = "cpu", float_dtype: torch.dtype = torch.float32,
                 rewrite: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None):
        """``float_dtype``: what the program's float32 values are computed in (torch.float64 for
        parity's float64 evaluation: constants, and values a node makes from non-float inputs,
        such as ``one_hot``, come out in it too). ``rewrite``: functions applied to the named
        inputs and values as soon as they exist (e.g. fake quantization)."""
        self.program = program
        self.rewrite = rewrite or {}
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
            env[value.name] = self._rewritten(value.name, feeds[value.name])
        for index, node in enumerate(self.program.nodes):
            if node.op == "constant":
                env[node.output.name] = self.constants[node.output.name]
                continue
            out = PRIMITIVES[node.op].reference(torch, *(env[n] for n in node.inputs), **node.attrs)
            out = out if self.float_dtype is torch.float32 else self._float(out)
            env[node.output.name] = self._rewritten(node.output.name, out)
            for name in self.release.get(index, ()):
                del env[name]
        return {v.name: env[v.name] for v in self.program.outputs}

    def _rewritten(self, name: str, value: torch.Tensor) -> torch.Tensor:
        return self.rewrite[name](value) if name in self.rewrite else value

    def run_numpy(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tensors = {k: torch.as_tensor(np.asarray(v), device=self.device) for k, v in feeds.items()}
        with torch.no_grad():
            out = self.run(tensors)
        return {k: v.cpu().numpy() for k, v in out.items()}
