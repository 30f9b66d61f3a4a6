"""The trainer: runs the lowered ``train_step`` through the shared training loop with the torch
reference backend (CPU or CUDA) or, on a CPU, compiled by onnxruntime or TVM (``compiled_train``);
checkpoints, metrics and plots go to a run directory. Evaluation runs in the torch reference."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..contract.checkpoint import CHECKPOINT, TEMP_FILES, Checkpoint, commit_epoch, start_or_resume
from ..contract.locking import exclusive, remove_stale
from ..core.errors import FFCompileError
from ..core.spec import Model
from ..loop.divergence import DivergenceError, check_tensors, stopped
from ..loop.epochs import FEEDS, epoch_line
from ..loop.evaluate import error_rate
from ..loop.nextchar import batched, perplexity
from ..loop.runner import epoch_runner
from ..lowering import READOUT_PROGRAMS, build_program, init_state, readouts_of, train_programs
from .interpreter import TorchProgram



class ReferenceStep:
    """A training program (``train_step``, or a next-character model's ``train_positive`` /
    ``train_negative``) as a loop step function; params and state stay torch tensors on ``device``."""

    def __init__(self, model: Model, device: str = "cpu", cuda_graph: bool | None = None, log=print,
                 program: str = "train_step"):
        self.program = TorchProgram(build_program(model, program, model.training.batch_size), device)
        self.device = self.program.device
        names = [v.name for v in self.program.program.inputs]
        self.feed_names = {n for n in FEEDS if n in names}
        # On a GPU the step is hundreds of small kernels: replaying one captured CUDA graph removes
        # the per-op launch cost (the program has static shapes and no host syncs, so it captures).
        self.use_graph = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        self.graph = None
        self.log = log

    def _capture(self, inputs: dict[str, torch.Tensor]) -> None:
        self.static_in = {k: v.clone() for k, v in inputs.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(2):
                self.program.run(self.static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            self.static_out = self.program.run(self.static_in)
        self.graph = graph

    def _run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.use_graph and self.graph is None:
            try:
                self._capture(inputs)
            except Exception as e:  # capture support varies by driver/torch build: say so, run eagerly
                self.log(f"warning: CUDA graph capture failed ({type(e).__name__}: {e}); running the step eagerly")
                self.use_graph = False
        if not self.use_graph:
            with torch.no_grad():
                return self.program.run(inputs)
        for name, value in inputs.items():
            if value is not self.static_in[name]:
                self.static_in[name].copy_(value)
        self.graph.replay()
        return self.static_out

    def to_device(self, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {k: torch.as_tensor(np.asarray(v), device=self.device) for k, v in arrays.items()}

    def __call__(self, params, state, feeds):
        inputs = {**params, **state, **self.to_device({k: v for k, v in feeds.items() if k in self.feed_names})}
        out = self._run(inputs)
        new_params = {k: out[f"new.{k}"] for k in params}
        new_state = {k: out[f"new.{k}"] for k in state}
        scalars = {k: v for k, v in out.items() if not k.startswith("new.") and v.ndim == 0}
        values = torch.stack(list(scalars.values())).cpu().numpy() if scalars else []
        return new_params, new_state, dict(zip(scalars, map(float, values)))


def numpy_dict(tensors: dict) -> dict[str, np.ndarray]:
    """torch tensors (the reference backend) or numpy arrays (compiled backends) as numpy arrays."""
    return {k: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v) for k, v in tensors.items()}


def reference_runner(model: Model, program: str, batch: int, params: dict[str, np.ndarray], device: str = "cpu"):
    """(numpy runner of ``program`` at ``batch``, the part of ``params`` it takes)."""
    torch_program = TorchProgram(build_program(model, program, batch), device)
    needed = {v.name for v in torch_program.program.inputs}
    return torch_program.run_numpy, {k: v for k, v in params.items() if k in needed}


def evaluate_params(model: Model, params: dict[str, np.ndarray], x, y, readout: str, batch: int = 100,
                    device: str = "cpu", progress: bool = False) -> float:
    runner, inputs = reference_runner(model, READOUT_PROGRAMS[readout], batch, params, device)
    return error_rate(runner, inputs, x, y, batch, progress, f"eval {readout}")


def _epoch_runner(model: Model, step_fn: ReferenceStep, device: str, eval_batch: int, seed: int, progress: bool, log):
    """The shared loop (``loop.runner.epoch_runner``) driving the reference's training programs."""
    if not model.family.predicts_characters:
        return epoch_runner(model, {"train_step": step_fn}, seed, progress)
    steps = {name: step_fn if name == "train_step" else ReferenceStep(model, device, log=log, program=name)
             for name in train_programs(model)}
    probs = TorchProgram(build_program(model, "infer_softmax", eval_batch), device)
    needed = {v.name for v in probs.program.inputs}
    return epoch_runner(model, steps, seed, progress, probs_fn=batched(probs.run_numpy, eval_batch),
                        host_params=lambda p: {k: v for k, v in numpy_dict(p).items() if k in needed})


def sequence_perplexity(model: Model, params: dict[str, np.ndarray], x, y, batch: int = 100, device: str = "cpu") -> float:
    runner, inputs = reference_runner(model, "infer_softmax", batch, params, device)
    return perplexity(batched(runner, batch), inputs, x, y)


def _evaluate(model: Model, data, np_params: dict, record: dict, eval_batch: int, device: str) -> None:
    """Validation (and monitor) errors, perplexities for next-character models, into ``record``."""
    sets = {"val": (data.x_val, data.y_val), **data.monitor} if data.x_val is not None else data.monitor
    if model.family.predicts_characters:
        sets = {"train": (data.x_train, data.y_train), **sets}
    for set_name, (xs, ys) in sets.items():
        if model.family.predicts_characters:
            record[f"{set_name}_perplexity"] = sequence_perplexity(model, np_params, xs, ys, eval_batch, device)
            if set_name == "train":
                continue
        for readout in readouts_of(model):
            record[f"{set_name}_error.{readout}"] = evaluate_params(
                model, np_params, xs, ys, readout, batch=eval_batch, device=device)


@dataclass
class Dataset:
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray | None
    y_val: np.ndarray | None
    description: str
    monitor: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # reported, never tuned on


def train(model: Model, data: Dataset, run_dir: Path, epochs: int, resume: bool = False, device: str = "cpu",
          seed: int | None = None, progress: bool = True, eval_every: int = 1, log=print, make_step=None,
          writer: bool = True, backend: str = "torch") -> Checkpoint:
    """Train until ``epochs`` epochs are done. ``make_step``: checkpoint -> the loop's step
    function (default: the torch reference's ``train_step`` in this process; the CLI passes a
    data-parallel or a compiled one). ``writer``: whether this process validates and writes the
    run, holding the run folder's lock (false on all but one process of a data-parallel job).
    ``backend``: the name of the step's backend, recorded in metrics.json (a compiled one comes
    with ``make_step=ffcompile.compiler.compiled_train.compiled_steps(...)``)."""
    if backend != "torch" and make_step is None:
        raise FFCompileError(f"backend {backend!r}: pass make_step=compiled_steps(model, {backend!r}, data) "
                             "(ffcompile.compiler.compiled_train)")
    with exclusive(run_dir, "ffcompile train") if writer else contextlib.nullcontext():
        if writer and Path(run_dir).is_dir():
            remove_stale(run_dir, TEMP_FILES, log)
        return _train(model, data, Path(run_dir), epochs, resume, device, seed, progress, eval_every, log,
                      make_step, writer, backend)


def _train(model: Model, data: Dataset, run_dir: Path, epochs: int, resume: bool, device: str, seed: int | None,
           progress: bool, eval_every: int, log, make_step, writer: bool, backend: str) -> Checkpoint:
    ckpt_path = run_dir / CHECKPOINT
    seed = model.training.seed if seed is None else seed
    ckpt, history = start_or_resume(run_dir, model, resume, lambda: Checkpoint(model, *init_state(model, seed), 0, 0), log)
    if writer:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "model.json").write_text(model.dumps() + "\n")

    step_fn = make_step(ckpt) if make_step else ReferenceStep(model, device, log=log)
    # On a GPU, per-epoch evaluation in batches of 100 is launch-bound; larger batches give the
    # same predictions.
    eval_batch = 1000 if torch.device(device).type == "cuda" else 100
    to_device = getattr(step_fn, "to_device", dict)  # a compiled step keeps numpy arrays
    params, state = to_device(ckpt.params), to_device(ckpt.state)
    epoch_fn = _epoch_runner(model, step_fn, device, eval_batch, seed, progress, log)
    step = ckpt.step
    saved = ckpt.epoch if resume else None  # the epoch of the checkpoint on disk
    try:
        for epoch in range(ckpt.epoch, epochs):
            started = time.perf_counter()
            params, state, step, metrics = epoch_fn(params, state, data.x_train, data.y_train, epoch, epochs, step)
            if hasattr(step_fn, "gather"):  # a step that keeps part of the model per process (layer-pipelined)
                params, state = step_fn.gather(params, state)
            record = {"epoch": epoch + 1, "step": step, "seconds": round(time.perf_counter() - started, 3), **metrics}
            np_params, np_state = numpy_dict(params), numpy_dict(state)
            check_tensors(np_params, "parameter", step, epoch)
            check_tensors(np_state, "optimizer state", step, epoch)
            if not writer:
                ckpt = Checkpoint(model, np_params, np_state, epoch + 1, step)
                continue
            if (epoch + 1) % eval_every == 0 or epoch + 1 == epochs:
                _evaluate(model, data, np_params, record, eval_batch, device)
            history.append(record)
            ckpt = Checkpoint(model, np_params, np_state, epoch + 1, step)
            commit_epoch(run_dir, ckpt, {"model": model.name, "data": data.description, "backend": backend,
                                         "epochs": history})
            saved = epoch + 1
            log(epoch_line(record))
    except (DivergenceError, KeyboardInterrupt) as e:
        raise stopped(e, ckpt_path, saved) from None
    return ckpt

