"""Loading a bundle's compiled programs, one loader per backend (``target.backend``).

A loader takes the program file, the target (its JSON form) and a display name, and returns an
object with ``run(feeds: dict[str, ndarray]) -> dict[str, ndarray]``. onnxruntime is built in; a
TVM loader slots in with ``register_loader("tvm", ...)`` (or an entry in ``LOADERS``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import FFCompileError


class Runnable(Protocol):
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


Loader = Callable[[Path, dict, str], Runnable]


def _load_onnxruntime(path: Path, target: dict, name: str) -> Runnable:
    from .ort import OrtProgram

    program = OrtProgram(path.read_bytes(), providers=list(target["providers"]), name=name)
    active = program.session.get_providers()
    if target["providers"][0] not in active:
        # onnxruntime may fall back to the CPU silently when a GPU provider fails to start.
        raise FFCompileError(f"{name}: onnxruntime did not start {target['providers'][0]} (running on {', '.join(active)})")
    return program


LOADERS: dict[str, Loader] = {"onnxruntime": _load_onnxruntime}


def register_loader(backend: str, loader: Loader) -> None:
    LOADERS[backend] = loader


def load_program(path: Path, target: dict, name: str, signature: dict | None = None) -> Runnable:
    """Load one compiled program; with ``signature`` (the manifest's inputs/outputs), check the
    compiled program exposes exactly those inputs and outputs."""
    backend = target.get("backend")
    if backend not in LOADERS:
        raise FFCompileError(f"{name}: this runtime has no loader for backend {backend!r} "
                             f"(available: {', '.join(sorted(LOADERS))})")
    program = LOADERS[backend](Path(path), target, name)
    if signature is not None and hasattr(program, "inputs") and hasattr(program, "output_names"):
        want_in = {v["name"] for v in signature["inputs"]}
        want_out = {v["name"] for v in signature["outputs"]}
        if set(program.inputs) != want_in or set(program.output_names) != want_out:
            raise FFCompileError(f"{name}: the compiled program's inputs/outputs do not match the manifest")
    return program
