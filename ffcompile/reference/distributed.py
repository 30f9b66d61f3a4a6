"""Data-parallel FF training on ``torch.distributed`` (gloo on CPU, NCCL on GPUs), launched by
``torchrun`` or ``ffcompile train --nproc N``.

Every process runs the same host loop with the same seed, so all see the same global batches,
shuffles and negative-label uniforms. Each takes its shard of the rows of every batch and runs
``train_gradients`` on it: the local rules' and the readout's gradients and the sums peer
normalization needs, each scaled by 1 / the global batch. One all-reduce (a sum) of those makes
them the whole batch's; ``train_apply`` then runs peer normalization and the optimizer, the same
on every process. N processes therefore compute the step of one process with the global batch,
up to the order of floating-point additions. Rank 0 writes checkpoints and metrics; a checkpoint
is the whole model, so a run resumes with any number of processes.
"""

from __future__ import annotations

import datetime
import os

import numpy as np
import torch
import torch.distributed as dist

from ..core.errors import FFCompileError
from ..core.family import Family
from ..core.spec import Model
from ..lowering import build_program
from .interpreter import TorchProgram

ROW_FEEDS = ("x", "y", "u", "x_other", "mask_bits")  # one entry per row of the batch: sharded
TIMEOUT_ENV = "FFCOMPILE_DIST_TIMEOUT"


def launched() -> bool:
    """True inside a process started by torchrun with more than one process in the job."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start(device: str) -> tuple[int, int]:
    """Joins the job torchrun started: (rank, world size). A peer that is gone or silent for
    $FFCOMPILE_DIST_TIMEOUT seconds (default 600) fails the collective instead of hanging."""
    timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "600")))
    backend = "nccl" if device.startswith("cuda") else "gloo"
    try:
        dist.init_process_group(backend, timeout=timeout)
    except (RuntimeError, ValueError) as e:
        raise FFCompileError(f"could not join the torch.distributed job ({backend}): {one_line(e)}") from None
    return dist.get_rank(), dist.get_world_size()


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def one_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def shard_rows(batch: int, world: int, rank: int) -> slice:
    """Rank ``rank``'s rows of a batch: near-equal contiguous shards, the first ones one row larger."""
    if world > batch:
        raise FFCompileError(f"{world} processes for a batch of {batch}: every process needs at least one row "
                             "(use fewer processes or a larger training.batch_size)")
    base, extra = divmod(batch, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


class DataParallelStep:
    """The loop's step function (params, state, feeds) -> (params, state, metrics), like
    ``ReferenceStep``, computing the global batch's step across the job."""

    def __init__(self, model: Model, device: str, rank: int, world: int):
        if model.family is not Family.FEED_FORWARD:
            raise FFCompileError(f"model {model.name!r}: data-parallel training supports feed-forward models; "
                                 f"this one is {model.family.value}")
        batch = model.training.batch_size
        self.rows = shard_rows(batch, world, rank)
        self.gradients = TorchProgram(build_program(model, "train_gradients", self.rows.stop - self.rows.start), device)
        self.apply = TorchProgram(build_program(model, "train_apply", batch), device)
        self.device = self.gradients.device
        self.feed_names = {v.name for v in self.gradients.program.inputs} & set(ROW_FEEDS)
        self.schedule_names = {v.name for v in self.apply.program.inputs} & {"lr", "step"}
        self.reduced = sorted(v.name for v in self.gradients.program.outputs if v.name != "negative_labels")

    def to_device(self, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {k: torch.as_tensor(np.asarray(v), device=self.device) for k, v in arrays.items()}

    def __call__(self, params, state, feeds):
        shard = self.to_device({k: np.asarray(feeds[k])[self.rows] for k in self.feed_names})
        with torch.no_grad():
            out = self.gradients.run({**params, **shard})
        summed = all_reduce_sum({k: out[k] for k in self.reduced})
        schedule = self.to_device({k: feeds[k] for k in self.schedule_names})
        with torch.no_grad():
            new = self.apply.run({**params, **state, **summed, **schedule})
        metrics = {k: v for k, v in {**summed, **new}.items() if not k.startswith(("new.", "grad.", "peer.")) and v.ndim == 0}
        values = torch.stack(list(metrics.values())).cpu().numpy() if metrics else []
        return ({k: new[f"new.{k}"] for k in params}, {k: new[f"new.{k}"] for k in state},
                dict(zip(metrics, map(float, values))))


def all_reduce_sum(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sums every tensor over the job in one flat all-reduce."""
    flat = torch.cat([t.reshape(-1) for t in tensors.values()])
    try:
        dist.all_reduce(flat)
    except (RuntimeError, dist.DistError) as e:
        raise FFCompileError(f"rank {dist.get_rank()}: lost the other processes of the job "
                             f"({one_line(e)}); resume the run with --resume") from None
    out, offset = {}, 0
    for name, t in tensors.items():
        out[name] = flat[offset:offset + t.numel()].reshape(t.shape)
        offset += t.numel()
    return out
