"""Loading a bundle's compiled programs, one loader per backend (``target.backend``).

A loader takes the program file, the target (its JSON form) and a display name, and returns an
object with ``run(feeds: dict[str, ndarray]) -> dict[str, ndarray]``. onnxruntime and TVM are built
in; another backend slots in with ``register_loader(backend, ...)``.
"""

from __future__ import annotations

from collections.abc import Callable
import os
from pathlib import Path
from typing import Protocol

import numpy as np

from ..core.errors import FFCompileError


class Runnable(Protocol):
    """A loaded program. One that writes its new state over its inputs (``TVMProgram.in_place``)
    also takes ``run(feeds, donate=True)``."""

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


Loader = Callable[[Path, dict, str], Runnable]
THREADS_ENV = "FFCOMPILE_ORT_THREADS"  # onnxruntime intra-op threads of loaded programs (default: one per core)


def _load_onnxruntime(path: Path, target: dict, name: str) -> Runnable:
    from .ort import OrtProgram, check_self_contained

    model_bytes = path.read_bytes()
    check_self_contained(model_bytes, name)
    threads = os.environ.get(THREADS_ENV)
    program = OrtProgram(model_bytes, providers=list(target["providers"]), name=name,
                         threads=int(threads) if threads and threads.isdigit() else None)
    active = program.session.get_providers()
    if target["providers"][0] not in active:
        # onnxruntime may fall back to the CPU silently when a GPU provider fails to start.
        raise FFCompileError(f"{name}: onnxruntime did not start {target['providers'][0]} (running on {', '.join(active)})")
    return program


def _load_tvm(path: Path, target: dict, name: str) -> Runnable:
    """A TVM shared library + its sidecar ``<lib>.so.json``; needs only the TVM runtime."""
    from .machine import require_elf_for
    from .tvm import load, sidecar_path

    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        raise FFCompileError(f"{name}: its sidecar {sidecar.name} (input/output names) is missing")
    try:
        require_elf_for(path)  # a library for another CPU: one line, not a dlopen failure
    except FFCompileError as e:
        raise FFCompileError(f"{name}: {e}") from None
    try:
        import tvm  # noqa: F401
    except ImportError:
        raise FFCompileError(f"{name}: needs the TVM runtime (pip install apache-tvm)") from None
    try:
        return load(path, device="cuda" if target.get("device") == "cuda" else "cpu")
    except Exception as e:  # tvm raises its own error types
        raise FFCompileError(f"{name}: TVM could not load it: {str(e).strip().splitlines()[-1]}") from None


LOADERS: dict[str, Loader] = {"onnxruntime": _load_onnxruntime, "tvm": _load_tvm}
# Files a program of a backend reads beside its own (TVM: the sidecar); they must be hashed too.
COMPANION_SUFFIXES: dict[str, tuple[str, ...]] = {"tvm": (".json",)}


def register_loader(backend: str, loader: Loader, companion_suffixes: tuple[str, ...] = ()) -> None:
    LOADERS[backend] = loader
    COMPANION_SUFFIXES[backend] = companion_suffixes


def program_files(backend: str, rel: str) -> list[str]:
    """The bundle files a program of ``backend`` stored as ``rel`` reads."""
    return [rel, *(rel + suffix for suffix in COMPANION_SUFFIXES.get(backend, ()))]


def load_program(path: Path, target: dict, name: str, signature: dict | None = None) -> Runnable:
    """Load one compiled program; with ``signature`` (the manifest's inputs/outputs), check the
    compiled program exposes exactly those inputs and outputs."""
    backend = target.get("backend")
    if backend not in LOADERS:
        raise FFCompileError(f"{name}: this runtime has no loader for backend {backend!r} "
                             f"(available: {', '.join(sorted(LOADERS))})")
    program = LOADERS[backend](Path(path), target, name)
    inputs = getattr(program, "inputs", getattr(program, "input_names", None))
    if signature is not None and inputs is not None and hasattr(program, "output_names"):
        want_in = {v["name"] for v in signature["inputs"]}
        want_out = {v["name"] for v in signature["outputs"]}
        if set(inputs) != want_in or set(program.output_names) != want_out:
            raise FFCompileError(f"{name}: the compiled program's inputs/outputs do not match the manifest")
    return program
