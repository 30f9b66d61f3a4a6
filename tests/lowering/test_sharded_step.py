"""A train step split for data parallelism: ``train_gradients`` on shards of the batch, summed,
then ``train_apply``, is the one-process ``train_step`` of the whole batch (float64, so the
tolerance measures the algebra, not rounding)."""

import dataclasses

import numpy as np
import pytest
import torch

from ffcompile.lowering import build_program, init_state
from ffcompile.reference.interpreter import TorchProgram
from ffcompile.core.spec import (DenseLayer, Goodness, InputSpec, LabelEmbedding, LocalLayer, Model, Negatives, Optimizer,
                                 PeerNorm, Readout, Regularizers, Training)

BATCH = 6


def model_of(kind: str) -> Model:
    model = Model(
        name="tiny", input=InputSpec(size=64, image_shape=(8, 8)),
        layers=(DenseLayer("h1", 12), DenseLayer("h2", 9), DenseLayer("h3", 7)),
        goodness=Goodness(threshold_per_unit=0.5),
        regularizers=Regularizers(weight_decay=1e-2, peer_norm=PeerNorm(weight=0.5, momentum=0.8)),
        optimizer=Optimizer(kind="adam", lr=0.01), negatives=Negatives(kind="hard_label"),
        readout=Readout(goodness_layers=("h2", "h3"), softmax_layers=("h2", "h3")), training=Training(batch_size=BATCH))
    if kind == "sgd-no-peer":
        model = dataclasses.replace(model, regularizers=Regularizers(weight_decay=1e-2),
                                    optimizer=Optimizer(kind="sgd", lr=0.05, momentum=0.9))
    if kind == "unsupervised-local":
        model = dataclasses.replace(
            model, input=dataclasses.replace(model.input, label=LabelEmbedding(kind="none")),
            layers=(LocalLayer("h1", grid=3, field=4, stride=2, channels=3), LocalLayer("h2", grid=2, field=2, stride=1, channels=4),
                    LocalLayer("h3", grid=1, field=2, stride=1, channels=5)),
            negatives=Negatives(kind="hybrid_image", blur_passes=2), readout=Readout(softmax_layers=("h2", "h3")))
    return model


def run(model, name, batch, feeds):
    program = TorchProgram(build_program(model, name, batch))
    with torch.no_grad():
        return program.run({v.name: feeds[v.name] for v in program.program.inputs})


@pytest.mark.parametrize("kind", ["adam-peer", "sgd-no-peer", "unsupervised-local"])
@pytest.mark.parametrize("shards", [(2, 4), (3, 3), (1, 1, 1, 1, 1, 1)], ids=["2+4", "3+3", "6x1"])
def test_shards_summed_then_applied_equal_the_whole_batch_step(kind, shards):
    model = model_of(kind)
    rng = np.random.default_rng(3)
    params, state = init_state(model, seed=1)
    t64 = lambda a: torch.tensor(np.asarray(a, dtype=np.float64))
    params = {k: t64(v + rng.normal(0, 0.1, v.shape)) for k, v in params.items()}
    state = {k: t64(np.abs(rng.normal(0, 0.05, v.shape))) for k, v in state.items()}
    rows = {"x": t64(rng.random((BATCH, 64))), "y": torch.tensor(rng.integers(0, 10, BATCH)), "u": t64(rng.random(BATCH)),
            "x_other": t64(rng.random((BATCH, 64))), "mask_bits": t64(rng.integers(0, 2, (BATCH, 64)))}
    schedule = {"lr": t64(0.01), "step": t64(3.0)}
    whole = run(model, "train_step", BATCH, {**params, **state, **rows, **schedule})

    start, summed = 0, {}
    for size in shards:
        shard = {k: v[start:start + size] for k, v in rows.items()}
        out = run(model, "train_gradients", size, {**params, **shard})
        for k, v in out.items():
            if k != "negative_labels":
                summed[k] = summed[k] + v if k in summed else v
        start += size
    applied = run(model, "train_apply", BATCH, {**params, **state, **summed, **schedule})

    checked = 0
    for name, want in whole.items():
        got = applied.get(name, summed.get(name))
        if name == "negative_labels":
            continue
        scale = max(float((want - (params | state).get(name[4:], 0)).abs().max()) if name.startswith("new.") else
                    float(want.abs().max()), 1e-12)
        assert float((got - want).abs().max()) <= 1e-12 * scale, name
        checked += 1
    assert checked == len(whole) - ("negative_labels" in whole)
