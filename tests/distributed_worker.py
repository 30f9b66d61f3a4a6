"""Not a test: one process of a small data-parallel job for tests/test_distributed.py. Trains
tests/bundle/tiny.toml (Adam, peer normalization: batch statistics that cross the shards) for
one epoch of 20 steps on random images through the shared host loop, with DataParallelStep (or
PipelineStep, --pipeline) when started as part of a job (RANK / WORLD_SIZE set), else with the
one-process train_step; rank 0 writes the final parameters and optimizer state to OUT (.npz).
With --mnist it trains on the built-in MNIST subset's first images instead.

    python tests/distributed_worker.py OUT [--float64] [--sgd] [--pipeline] [--mnist] [--unsupervised]
        [--die-at STEP]
"""

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import numpy as np
import torch

from ffcompile.core.errors import FFCompileError
from ffcompile.core.spec import LabelEmbedding, Negatives, Optimizer, Readout, load_model
from ffcompile.data.datasets import load_model_split
from ffcompile.loop.epochs import run_epoch
from ffcompile.lowering import init_state
from ffcompile.reference import distributed
from ffcompile.reference.train import ReferenceStep

STEPS = 20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--float64", action="store_true")
    ap.add_argument("--sgd", action="store_true", help="SGD with momentum instead of the spec's Adam")
    ap.add_argument("--pipeline", action="store_true", help="layer-pipelined instead of data-parallel")
    ap.add_argument("--mnist", action="store_true", help="the built-in MNIST subset's first images, not random pixels")
    ap.add_argument("--unsupervised", action="store_true",
                    help="no labels in the input, hybrid-image negatives, the softmax readout on h1 and h2")
    ap.add_argument("--die-at", type=int, default=None, help="rank 1 exits abruptly at this step")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = load_model(Path(__file__).parent / "bundle" / "tiny.toml")
    if args.sgd:
        model = dataclasses.replace(model, optimizer=Optimizer(kind="sgd", lr=0.05, momentum=0.9))
    if args.unsupervised:
        model = dataclasses.replace(model, input=dataclasses.replace(model.input, label=LabelEmbedding(kind="none")),
                                    negatives=Negatives(kind="hybrid_image", blur_passes=2),
                                    readout=Readout(softmax_layers=("h1", "h2")))
    dtype = np.float64 if args.float64 else np.float32
    rng = np.random.default_rng(0)
    x = rng.random((STEPS * model.training.batch_size, model.input.size)).astype(np.float32)
    y = rng.integers(0, model.input.label.classes, len(x))
    if args.mnist:
        _, x, y = load_model_split(model, None, "train")
        x, y = x[:STEPS * model.training.batch_size], y[:STEPS * model.training.batch_size]
    rank = 0
    if distributed.launched():
        rank, world = distributed.start("cpu")
        kind = distributed.PipelineStep if args.pipeline else distributed.DataParallelStep
        step_fn = kind(model, "cpu", rank, world)
    else:
        step_fn = ReferenceStep(model, "cpu")

    def step(params, state, feeds):
        if args.die_at is not None and rank == 1 and int(feeds["step"]) == args.die_at:
            os._exit(3)
        feeds = {k: v.astype(dtype) if np.asarray(v).dtype.kind == "f" else v for k, v in feeds.items()}
        return step_fn(params, state, feeds)

    params, state = (step_fn.to_device({k: v.astype(dtype) for k, v in d.items()}) for d in init_state(model, 1))
    try:
        params, state, _, _ = run_epoch(model, step, params, state, x, y, 0, 1, 0, seed=5, progress=False)
        if hasattr(step_fn, "gather"):
            params, state = step_fn.gather(params, state)
    except FFCompileError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:  # leaving the job before exit, as the CLI does: a process group torn down at exit can abort
        distributed.stop()
    if rank == 0:
        np.savez(args.out, **{k: v.numpy() for k, v in {**params, **state}.items()})


if __name__ == "__main__":
    main()
