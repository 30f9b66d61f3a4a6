"""Checkpoints: parameters and optimizer state in one safetensors file, with the model IR, the
training position and the run's metrics up to it in its metadata. Written atomically (temp file +
rename) so an interrupted write never leaves a half checkpoint behind; metrics.json is a copy of
the metrics in the checkpoint, rewritten from it on resume, so a kill between the two writes
loses nothing."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from ..core.errors import FFCompileError
from ..core.spec import Model, model_from_json
from ..lowering.state import param_specs, state_specs


CHECKPOINT = "checkpoint.safetensors"
METRICS = "metrics.json"


@dataclass
class Checkpoint:
    model: Model
    params: dict[str, np.ndarray]
    state: dict[str, np.ndarray]
    epoch: int  # epochs completed
    step: int  # optimizer steps taken
    metrics: dict | None = None  # the metrics.json document up to this checkpoint


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename over ``path`` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


TEMP_FILES = (".*.tmp", ".tmp??????")  # what atomic_write, and safetensors inside it, leave when killed


def save_checkpoint(path: Path, ckpt: Checkpoint) -> None:
    tensors = {**{f"param/{k}": v for k, v in ckpt.params.items()}, **{f"state/{k}": v for k, v in ckpt.state.items()}}
    meta = {"model": ckpt.model.dumps(), "epoch": str(ckpt.epoch), "step": str(ckpt.step), "format": "ffcompile-checkpoint-1"}
    if ckpt.metrics is not None:
        meta["metrics"] = json.dumps(ckpt.metrics)
    atomic_write(path, lambda tmp: save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp), metadata=meta))


def load_checkpoint(path: Path) -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise FFCompileError(f"{path}: checkpoint not found")
    try:
        from safetensors import safe_open

        with safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise FFCompileError(f"{path}: not a readable safetensors checkpoint ({e})") from None
    if meta.get("format") != "ffcompile-checkpoint-1":
        raise FFCompileError(f"{path}: not an ffcompile checkpoint (metadata format {meta.get('format')!r})")
    model = model_from_json(meta["model"], source=f"{path} (metadata)")
    params = {k[len("param/"):]: v for k, v in tensors.items() if k.startswith("param/")}
    state = {k[len("state/"):]: v for k, v in tensors.items() if k.startswith("state/")}
    for what, got, want in (("parameters", params, param_specs(model)), ("optimizer state", state, state_specs(model))):
        if set(got) != set(want):
            raise FFCompileError(f"{path}: {what} do not match the model: missing {sorted(set(want) - set(got))}, "
                                 f"unexpected {sorted(set(got) - set(want))}")
        for name, shape in want.items():
            if tuple(got[name].shape) != tuple(shape):
                raise FFCompileError(f"{path}: {name} has shape {got[name].shape}, the model needs {shape}")
            if not np.isfinite(got[name]).all():
                raise FFCompileError(f"{path}: {what} {name} has NaN/inf values; the checkpoint is unusable")
    try:
        metrics = json.loads(meta["metrics"]) if "metrics" in meta else None
    except ValueError:
        raise FFCompileError(f"{path}: its metrics metadata is not valid JSON") from None
    return Checkpoint(model, params, state, int(meta["epoch"]), int(meta["step"]), metrics)


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1) + "\n"))


def commit_epoch(run_dir: Path, ckpt: Checkpoint, metrics: dict) -> None:
    """Save the checkpoint with the run's metrics in it (the commit), then metrics.json (a copy)."""
    save_checkpoint(Path(run_dir) / CHECKPOINT, dataclasses.replace(ckpt, metrics=metrics))
    write_json(Path(run_dir) / METRICS, metrics)


def start_or_resume(run_dir: Path, model: Model, resume: bool, fresh, log,
                    elsewhere: str = "choose another --out") -> tuple[Checkpoint, list[dict]]:
    """(checkpoint, per-epoch metrics) a run in ``run_dir`` continues from: resumed, or ``fresh()``
    for a new run, which refuses to overwrite a checkpoint already there."""
    if resume:
        return resume_run(run_dir, model, log)
    path = Path(run_dir) / CHECKPOINT
    if path.exists():
        raise FFCompileError(f"{path} exists: pass --resume to continue it, or {elsewhere}")
    return fresh(), []


def resume_run(run_dir: Path, model: Model, log) -> tuple[Checkpoint, list[dict]]:
    """The checkpoint and the per-epoch metrics up to it, to continue a run in ``run_dir``
    (a reference training run or an on-device fine-tuning run); refuses another model's run."""
    ckpt_path = Path(run_dir) / CHECKPOINT
    if not ckpt_path.is_file():
        raise FFCompileError(f"--resume: no checkpoint at {ckpt_path}")
    ckpt = load_checkpoint(ckpt_path)
    if ckpt.model != model:
        raise FFCompileError(f"--resume: {ckpt_path} was trained with a different model spec (or bundle settings) "
                             f"than {model.name!r}")
    history = []
    if ckpt.metrics is not None:  # the metrics committed with the checkpoint: metrics.json may lag behind
        history = list(ckpt.metrics.get("epochs", []))[: ckpt.epoch]
        write_json(Path(run_dir) / METRICS, {**ckpt.metrics, "epochs": history})
    elif (Path(run_dir) / METRICS).is_file():
        try:
            history = json.loads((Path(run_dir) / METRICS).read_text())["epochs"][: ckpt.epoch]
        except (ValueError, KeyError, TypeError):
            raise FFCompileError(f"--resume: {Path(run_dir) / METRICS} is damaged (not the metrics this run wrote); "
                                 "move it away to resume without the earlier epochs' metrics") from None
    log(f"resuming {ckpt_path} after epoch {ckpt.epoch} (step {ckpt.step})")
    return ckpt, history

