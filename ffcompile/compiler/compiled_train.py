"""Training on a compiled backend (``ffcompile train --backend onnxruntime|tvm``): the lowered
``train_step`` compiled for this machine's CPU, run by the same loop as the torch reference (same
batches, draws and learning rates; parameters and state as numpy arrays), after a short parity
check against the reference from the run's own starting weights."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from ..core.errors import FFCompileError
from ..core.spec import Model
from ..lowering import build_program
from ..runtime.machine import host_arch

BACKENDS = ("torch", "onnxruntime", "tvm")
# The host target each compiled backend trains with: the TVM one built for this machine's own CPU.
HOST_TARGETS = {"onnxruntime": "x86-cpu", "tvm": "x86-cpu-tvm-native"}
PARITY_STEPS = 3


def _available(backend: str) -> bool:
    try:
        __import__({"onnxruntime": "onnxruntime", "tvm": "tvm"}[backend])
    except ImportError:
        return False
    return True


def default_backend(model: Model, device: str) -> str:
    """The fastest verified backend for this model on this machine: TVM on x86-64 CPUs (then
    onnxruntime), the torch reference on GPUs and for next-character models."""
    if device != "cpu" or model.family.predicts_characters or host_arch() != "x86_64":
        return "torch"
    return next((b for b in ("tvm", "onnxruntime") if _available(b)), "torch")


def check_backend(model: Model, backend: str, device: str) -> None:
    if backend not in BACKENDS:
        raise FFCompileError(f"--backend: unknown backend {backend!r} (known: {', '.join(BACKENDS)})")
    if backend == "torch":
        return
    if device != "cpu":
        raise FFCompileError(f"--backend {backend} runs on this machine's CPU; --device {device} needs --backend torch")
    if model.family.predicts_characters:
        raise FFCompileError(f"--backend {backend}: next-character models ({model.name}) train with --backend torch only")
    if host_arch() != "x86_64":
        raise FFCompileError(f"--backend {backend}: compiled training targets x86-64 hosts, this one is {host_arch()}; "
                             "use --backend torch")
    if not _available(backend):
        raise FFCompileError(f"--backend {backend}: {backend} is not installed here (pip install "
                             f"{'apache-tvm' if backend == 'tvm' else 'onnxruntime'})")


def compiled_train_step(model: Model, backend: str, params: dict, state: dict, step: int, x, y, seed: int, log):
    """The compiled ``train_step`` as a loop step function, after it passed the parity harness
    (programs on random and real inputs, a ``PARITY_STEPS``-step trajectory) against the torch
    reference from ``params``/``state``. Raises a one-line error if it fails."""
    from ..reference.parity import summary_lines, verify
    from ..runtime.finetune import CompiledTrainStep
    from ..runtime.loaders import load_program
    from .build import COMPILERS
    from .targets import find_target

    target = find_target(HOST_TARGETS[backend])
    program = build_program(model, "train_step", model.training.batch_size)
    work = Path(tempfile.mkdtemp(prefix="ffcompile-train-"))
    try:  # a loaded library stays mapped after its file is removed
        (work / "programs").mkdir()
        rel = COMPILERS[target.backend](program, model, target, work)
        runner = load_program(work / rel, target.to_json(), f"train_step ({target.name})", program.signature())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"backend {backend}: train_step compiled for {target.name} ({target.description}); "
        f"checking parity against the torch reference ({PARITY_STEPS} steps)")
    report = verify(model, target.to_json(), {"train_step": runner}, params, state, step, x, y,
                    infer_batch=model.training.batch_size, steps=PARITY_STEPS, seed=seed)
    if not report["passed"]:
        failed = [line.strip() for line in summary_lines(report)[1:] if "FAIL" in line]
        raise FFCompileError(f"--backend {backend}: the compiled train_step failed its parity check against the torch "
                             f"reference ({failed[0] if failed else 'see ffcompile verify'}); train with --backend torch (which "
                             "also says where a run diverges, if the reference itself does)")
    carried = [*params, *state]
    return CompiledTrainStep(runner, program.signature(), carried)


def compiled_steps(model: Model, backend: str, data, log=print, seed: int | None = None):
    """``make_step`` for ``reference.train.train``: the compiled ``train_step`` (checked as
    ``compiled_train_step`` does) from the weights the run starts or resumes from.
    ``data``: the run's ``Dataset`` (its training rows feed the parity check)."""
    seed = model.training.seed if seed is None else seed
    check_backend(model, backend, "cpu")
    return lambda ckpt: compiled_train_step(model, backend, dict(ckpt.params), dict(ckpt.state), ckpt.step,
                                            data.x_train, data.y_train, seed, log)
