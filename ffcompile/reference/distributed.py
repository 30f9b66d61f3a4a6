"""FF training on ``torch.distributed`` (gloo on CPU, NCCL on GPUs), launched by ``torchrun`` or
``ffcompile train --nproc N``: data-parallel (``DataParallelStep``) or layer-pipelined
(``PipelineStep``).

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

import contextlib
import datetime
import os
import time

import numpy as np
import torch
import torch.distributed as dist

from ..core.errors import FFCompileError
from ..core.family import Family
from ..core.spec import Model
from ..lowering import (build_program, build_stage_program, owns_readout, pipeline_stages, runs_neutral_pass,
                        stage_params, stage_state)
from .interpreter import TorchProgram

ROW_FEEDS = ("x", "y", "u", "x_other", "mask_bits")  # one entry per row of the batch: sharded
TIMEOUT_ENV = "FFCOMPILE_DIST_TIMEOUT"


def launched() -> bool:
    """True inside a process started by torchrun with more than one process in the job."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_device(device: str) -> str:
    """This process's device in a job: ``cuda`` means the GPU torchrun gave it, cuda:$LOCAL_RANK
    (every process on its own GPU); ``cuda:N`` and ``cpu`` stay as they are."""
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if device == "cuda" else device


def start(device: str) -> tuple[int, int]:
    """Joins the job torchrun started: (rank, world size); ``device`` is ``local_device``'s. A
    peer that is gone or silent for $FFCOMPILE_DIST_TIMEOUT seconds (default 600) fails the
    collective instead of hanging."""
    timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "600")))
    backend = "nccl" if device.startswith("cuda") else "gloo"
    try:
        if backend == "nccl":
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group(backend, timeout=timeout)
    except (RuntimeError, ValueError, AssertionError) as e:  # AssertionError: a torch built without CUDA
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


def check_family(model: Model, mode: str) -> None:
    if model.family is not Family.FEED_FORWARD:
        raise FFCompileError(f"model {model.name!r}: {mode} training supports feed-forward models; "
                             f"this one is {model.family.value}")


class DataParallelStep:
    """The loop's step function (params, state, feeds) -> (params, state, metrics), like
    ``ReferenceStep``, computing the global batch's step across the job."""

    def __init__(self, model: Model, device: str, rank: int, world: int):
        check_family(model, "data-parallel")
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


@contextlib.contextmanager
def peers_alive():
    """Turns a failed collective or transfer (a peer died, or stayed silent past the timeout) into
    one line."""
    try:
        yield
    except (RuntimeError, dist.DistError) as e:
        raise FFCompileError(f"rank {dist.get_rank()}: lost the other processes of the job "
                             f"({one_line(e)}); resume the run with --resume") from None


def all_reduce_sum(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sums every tensor over the job in one flat all-reduce."""
    flat = torch.cat([t.reshape(-1) for t in tensors.values()])
    with peers_alive():
        dist.all_reduce(flat)
    return unflatten(flat, tensors)


def unflatten(flat: torch.Tensor, like: dict[str, torch.Tensor | tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """``flat`` cut into tensors shaped like ``like``'s (tensors or shapes), in its order."""
    out, offset = {}, 0
    for name, t in like.items():
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else tuple(t)
        size = int(np.prod(shape))
        out[name] = flat[offset:offset + size].reshape(shape)
        offset += size
    return out


def check_pipeline(model: Model, world: int) -> list[range]:
    """The layers of each of ``world`` processes of a layer-pipelined job, or a one-line refusal."""
    check_family(model, "layer-pipelined")
    return pipeline_stages(model, world)


def describe_stages(model: Model, world: int) -> str:
    """Which layers each process of a layer-pipelined job owns, e.g. ``h1-h2 | h3-h4``."""
    names = [model.layers[s.start].name + (f"-{model.layers[s.stop - 1].name}" if len(s) > 1 else "")
             for s in pipeline_stages(model, world)]
    return " | ".join(names)


class PipelineStep:
    """The loop's step function for layer-pipelined training: process r runs stage r of
    ``pipeline_stages`` (a contiguous range of layers; the softmax readout goes with its highest
    layer) and keeps only that stage's parameters up to date. The batch is cut into
    ``micro_batches`` contiguous micro-batches that stream forward through the stages, so stage r
    works on one micro-batch while stage r + 1 works on the one before:

    1. the neutral pass (supervised models with a softmax readout) streams to the readout's stage,
       which learns the readout and draws the hard negative labels from the same uniforms ``u``
       the one-process step uses, and sends them back to stage 0;
    2. the [positives; negatives] rows stream through every stage, each computing its own layers'
       local gradients and peer sums;
    3. each process sums its micro-batches' gradients and updates its own parameters
       (``stage_apply``) as soon as its last micro-batch is done.

    Every stage's parameters before the step are the ones the one-process step reads, and every
    gradient is a sum over rows, so this is the one-process step of the whole batch up to the
    order of floating-point additions. One all-reduce of the scalar metrics per step gives every
    process the same metrics (and the same divergence check); ``gather`` assembles the whole model
    for checkpoints."""

    def __init__(self, model: Model, device: str, rank: int, world: int, micro_batches: int | None = None):
        stages = check_pipeline(model, world)
        batch = model.training.batch_size
        self.rank, self.world, self.layers = rank, world, stages[rank]
        self.readout_rank = next((r for r, layers in enumerate(stages) if owns_readout(model, layers)), None)
        count = min(batch, micro_batches or 2 * world)
        self.micro = [shard_rows(batch, count, m) for m in range(count)]
        sizes = {rows.stop - rows.start for rows in self.micro}
        program = lambda name, size: TorchProgram(build_stage_program(model, name, size, self.layers), device)
        self.neutral = {n: program("stage_neutral", n) for n in sizes} if runs_neutral_pass(model, self.layers) else {}
        self.posneg = {n: program("stage_posneg", n) for n in sizes}
        self.apply = program("stage_apply", batch)
        self.device = self.apply.device
        self.param_names, self.state_names = stage_params(model, self.layers), stage_state(model, self.layers)
        self.schedule_names = {v.name for v in self.apply.program.inputs} & {"lr", "step"}
        self.metric_names = sorted(v.name for v in build_program(model, "train_step", batch).outputs if v.shape == ())
        self.sends: list = []
        self.seconds = {"compute": 0.0, "waiting": 0.0}  # running totals, for bench/bench_distributed.py
        self.bytes_sent = 0

    def to_device(self, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {k: torch.as_tensor(np.asarray(v), device=self.device) for k, v in arrays.items()}

    def __call__(self, params, state, feeds):
        dtype = next(iter(params.values())).dtype
        totals: dict[str, torch.Tensor] = {}
        negatives = {}
        with peers_alive():
            for m, rows in enumerate(self.micro if self.neutral else ()):
                out = self._run(self.neutral[rows.stop - rows.start], params, feeds, rows, dtype, negatives, m, totals)
                if "negative_labels" in out:
                    if self.rank == 0:
                        negatives[m] = out["negative_labels"]
                    else:
                        self._send([out["negative_labels"]], 0)
            for m, rows in enumerate(self.micro):
                self._run(self.posneg[rows.stop - rows.start], params, feeds, rows, dtype, negatives, m, totals)
            with self.timed("waiting"):
                for work, _buffer in self.sends:
                    work.wait()
            self.sends.clear()
        schedule = self.to_device({k: feeds[k] for k in self.schedule_names})
        with torch.no_grad(), self.timed("compute"):
            new = self.apply.run({**{k: params[k] for k in self.param_names}, **{k: state[k] for k in self.state_names},
                                  **totals, **schedule})
        zero = torch.zeros((), dtype=dtype, device=self.device)
        with self.timed("waiting"):
            metrics = all_reduce_sum({k: new.get(k, totals.get(k, zero)).to(dtype) for k in self.metric_names})
        values = torch.stack(list(metrics.values())).cpu().numpy() if metrics else []
        return ({k: new.get(f"new.{k}", v) for k, v in params.items()}, {k: new.get(f"new.{k}", v) for k, v in state.items()},
                dict(zip(metrics, map(float, values))))

    def _run(self, program: TorchProgram, params, feeds, rows: slice, dtype, negatives, m: int, totals):
        """Micro-batch ``m`` (``rows`` of the batch) through this stage: its inputs from the host
        feeds or the stage below, its stream to the stage above, its gradients, sums and metrics
        added to ``totals``. Returns its outputs."""
        names = [v.name for v in program.program.inputs]
        inputs = {k: params[k] for k in names if k in self.param_names}
        inputs.update(self.to_device({k: np.asarray(feeds[k])[rows] for k in names if k in ROW_FEEDS}))
        streamed = {v.name: v.shape for v in program.program.inputs if v.name.endswith(".in")}
        if streamed:
            inputs.update(self._recv(dict(sorted(streamed.items())), dtype, self.rank - 1))
        if "negative_labels" in names:
            inputs["negative_labels"] = negatives.pop(m) if m in negatives else \
                self._recv({"negative_labels": (rows.stop - rows.start,)}, torch.int64, self.readout_rank)["negative_labels"]
        with torch.no_grad(), self.timed("compute"):
            out = program.run(inputs)
        self._send([out[k] for k in sorted(k for k in out if k.endswith(".out"))], self.rank + 1)
        for k, v in out.items():
            if not k.endswith(".out") and k != "negative_labels":
                totals[k] = totals[k] + v if k in totals else v
        return out

    def _send(self, tensors: list[torch.Tensor], to: int) -> None:
        if tensors:
            flat = torch.cat([t.reshape(-1) for t in tensors])
            self.bytes_sent += flat.numel() * flat.element_size()
            self.sends.append((dist.isend(flat, to), flat))

    def _recv(self, shapes: dict[str, tuple[int, ...]], dtype, source: int) -> dict[str, torch.Tensor]:
        flat = torch.empty(sum(int(np.prod(s)) for s in shapes.values()), dtype=dtype, device=self.device)
        with self.timed("waiting"):
            dist.recv(flat, source)
        return unflatten(flat, shapes)

    @contextlib.contextmanager
    def timed(self, what: str):
        """Adds the block's wall time to ``seconds[what]``: "compute" (the stage's programs) or
        "waiting" (blocked on a transfer, on the stage below, or on the metrics' all-reduce)."""
        started = time.perf_counter()
        yield
        self.seconds[what] += time.perf_counter() - started

    def gather(self, params, state):
        """The whole model on every process (for checkpoints): each contributes the parameters and
        state it owns (zeros for the rest) to one sum."""
        owned = self.param_names | self.state_names
        mine = {k: v if k in owned else torch.zeros_like(v) for k, v in {**params, **state}.items()}
        whole = all_reduce_sum(mine)
        return {k: whole[k] for k in params}, {k: whole[k] for k in state}
