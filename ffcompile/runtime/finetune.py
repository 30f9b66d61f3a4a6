"""Forward-Forward fine-tuning on the device, driven entirely by the bundle's compiled
``train_step`` (next-character models: also its positive-only / negative-only halves, with
``infer_softmax`` generating negatives) through the shared training loops (``ffcompile.loop``): the same batches, random draws and learning rates as the PyTorch
reference trainer, so a run here and ``ffcompile train`` from the same weights take the same
steps up to fp32 rounding.

A run starts from the bundle's weights and optimizer state (Adam's step count included) and
counts its own epochs from 0; it saves ``checkpoint.safetensors`` atomically after every epoch and
``metrics.json`` beside it. ``resume`` continues an interrupted run bit-identically.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..contract.checkpoint import CHECKPOINT, TEMP_FILES, Checkpoint, commit_epoch, start_or_resume
from ..contract.locking import exclusive, remove_stale
from ..core.errors import FFCompileError
from ..loop.divergence import DivergenceError, check_tensors, stopped
from ..loop.epochs import FEEDS, epoch_line
from ..loop.runner import epoch_runner
from .inputs import as_images, as_labels
from .loaders import Runnable



class CompiledTrainStep:
    """The compiled ``train_step`` as a loop step function (numpy in, numpy out)."""

    def __init__(self, program: Runnable, signature: dict, carried):
        """``carried``: the names of the parameters and optimizer state; every other input of the
        program must be one of the loop's feeds (``loop.FEEDS``)."""
        self.program = program
        names = {v["name"] for v in signature["inputs"]}
        self.feed_names = [n for n in FEEDS if n in names]
        unknown = sorted(names - set(FEEDS) - set(carried))
        if unknown:
            raise FFCompileError(f"train_step takes inputs the training loop does not provide: {', '.join(unknown)}")
        self._returned: dict = {}  # the state arrays the last call returned

    def __call__(self, params, state, feeds):
        carried = {**params, **state}
        # the program may write the new state over the old only where the old is what the last
        # call returned (the loop has replaced it), never over arrays of the caller's (a bundle's
        # weights, a checkpoint being resumed)
        inputs = {**carried, **{k: feeds[k] for k in self.feed_names}}
        if getattr(self.program, "in_place", None) and all(v is self._returned.get(k) for k, v in carried.items()):
            out = self.program.run(inputs, donate=True)  # (TVMProgram)
        else:
            out = self.program.run(inputs)
        new_params = {k: out[f"new.{k}"] for k in params}
        new_state = {k: out[f"new.{k}"] for k in state}
        self._returned = {**new_params, **new_state}
        metrics = {k: float(v) for k, v in out.items() if not k.startswith("new.") and np.ndim(v) == 0}
        return new_params, new_state, metrics


def finetune(bundle, x, y, epochs: int, out_dir, resume: bool = False, progress: bool = True, val=None,
             seed: int | None = None, log=print) -> Checkpoint:
    """Train ``bundle``'s network on (x, y) until ``epochs`` epochs are done; ``val`` = (x, y) adds
    a validation error per epoch to metrics.json."""
    model = bundle.model
    if "train_step" not in bundle.programs:
        raise FFCompileError(f"bundle {bundle.path} has no train_step program")
    if epochs < 0:
        raise FFCompileError(f"epochs must be >= 0, got {epochs}")
    x = as_images(x, model.input.size, "training images")
    y = as_labels(y, len(x), model.input.label.classes, "training labels")
    if len(x) < model.training.batch_size:
        raise FFCompileError(f"{len(x)} training examples is less than one batch of {model.training.batch_size}")
    if val is not None:
        val = (as_images(val[0], model.input.size, "validation images"),
               as_labels(val[1], len(val[0]), model.input.label.classes, "validation labels"))
    out_dir = Path(out_dir)
    refuse_inside_bundle(out_dir, Path(bundle.path))
    with exclusive(out_dir, "ffcompile finetune"):
        if out_dir.is_dir():
            remove_stale(out_dir, TEMP_FILES, log)
        return _finetune(bundle, x, y, epochs, out_dir, resume, progress, val, seed, log)


def _finetune(bundle, x, y, epochs: int, out_dir: Path, resume: bool, progress: bool, val, seed, log) -> Checkpoint:
    model = bundle.model
    ckpt_path = out_dir / CHECKPOINT
    seed = model.training.seed if seed is None else seed
    ckpt, history = start_or_resume(out_dir, model, resume,
                                    lambda: Checkpoint(model, bundle.params, bundle.state, 0, bundle.step), log,
                                    "choose another output folder")
    out_dir.mkdir(parents=True, exist_ok=True)

    epoch_fn = _epoch_runner(bundle, [*ckpt.params, *ckpt.state], seed, progress)
    params, state, step = dict(ckpt.params), dict(ckpt.state), ckpt.step
    saved = ckpt.epoch if resume else None  # the epoch of the checkpoint on disk
    try:
        for epoch in range(ckpt.epoch, epochs):
            started = time.perf_counter()
            params, state, step, metrics = epoch_fn(params, state, x, y, epoch, epochs, step)
            check_tensors(params, "parameter", step, epoch)
            check_tensors(state, "optimizer state", step, epoch)
            record = {"epoch": epoch + 1, "step": step, "seconds": round(time.perf_counter() - started, 3), **metrics}
            if val is not None:
                tuned = bundle.with_params(params, state, epoch + 1, step)
                if model.family.predicts_characters:
                    record["val_perplexity"] = tuned.perplexity(val[0], val[1])
                for readout in bundle.readouts:
                    record[f"val_error.{readout}"] = tuned.evaluate(val[0], val[1], readout, "float32").error_percent
            history.append(record)
            ckpt = Checkpoint(model, params, state, epoch + 1, step)
            commit_epoch(out_dir, ckpt, {"model": model.name, "bundle": str(bundle.path),
                                         "target": bundle.target["name"], "started_from": bundle.weights_from,
                                         "epochs": history})
            saved = epoch + 1
            log(epoch_line(record))
    except (DivergenceError, KeyboardInterrupt) as e:
        raise stopped(e, ckpt_path, saved) from None
    return ckpt


def _epoch_runner(bundle, carried, seed: int, progress: bool):
    """The shared loop (``loop.runner.epoch_runner``) driving the bundle's compiled training programs
    (and, for next-character models, its ``infer_softmax`` for generation)."""
    steps = {name: CompiledTrainStep(program, bundle.signature(name), carried)
             for name, program in bundle.programs.items() if name.startswith("train_")}
    desc = f"finetune ({bundle.target['name']})"
    if not bundle.model.family.predicts_characters:
        return epoch_runner(bundle.model, steps, seed, progress, desc)
    from ..loop.nextchar import batched

    needed = {v["name"] for v in bundle.signature("infer_softmax")["inputs"]}
    return epoch_runner(bundle.model, steps, seed, progress, desc,
                        probs_fn=batched(bundle.programs["infer_softmax"].run, bundle.manifest["batch"]["infer"]),
                        host_params=lambda p: {k: v for k, v in p.items() if k in needed})


def refuse_inside_bundle(out_dir: Path, bundle_dir: Path) -> None:
    out, root = out_dir.resolve(), bundle_dir.resolve()
    if out == root or root in out.parents:
        raise FFCompileError(f"{out_dir}: fine-tuning output must be outside the bundle {bundle_dir} "
                             "(a bundle's files are checksummed and never written)")

