"""A train step split for data parallelism (``train_gradients`` on shards of the batch, summed,
then ``train_apply``) or by layers for pipelining (the stage programs on micro-batches) is the
one-process ``train_step`` of the whole batch (float64, so the tolerance measures the algebra, not
rounding)."""

import dataclasses

import numpy as np
import pytest
import torch

from ffcompile.lowering import (build_program, build_stage_program, init_state, pipeline_stages, runs_neutral_pass,
                                 stage_params, stage_state)
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
    program = TorchProgram(build_program(model, name, batch), float_dtype=torch.float64)
    with torch.no_grad():
        return program.run({v.name: feeds[v.name] for v in program.program.inputs})


def random_step_inputs(model):
    """(params, state, the batch's rows, the schedule) in float64, perturbed from the initial ones."""
    rng = np.random.default_rng(3)
    params, state = init_state(model, seed=1)
    t64 = lambda a: torch.tensor(np.asarray(a, dtype=np.float64))
    params = {k: t64(v + rng.normal(0, 0.1, v.shape)) for k, v in params.items()}
    state = {k: t64(np.abs(rng.normal(0, 0.05, v.shape))) for k, v in state.items()}
    rows = {"x": t64(rng.random((BATCH, 64))), "y": torch.tensor(rng.integers(0, 10, BATCH)), "u": t64(rng.random(BATCH)),
            "x_other": t64(rng.random((BATCH, 64))), "mask_bits": t64(rng.integers(0, 2, (BATCH, 64)))}
    return params, state, rows, {"lr": t64(0.01), "step": t64(3.0)}


@pytest.mark.parametrize("kind", ["adam-peer", "sgd-no-peer", "unsupervised-local"])
@pytest.mark.parametrize("shards", [(2, 4), (3, 3), (1, 1, 1, 1, 1, 1)], ids=["2+4", "3+3", "6x1"])
def test_shards_summed_then_applied_equal_the_whole_batch_step(kind, shards):
    model = model_of(kind)
    params, state, rows, schedule = random_step_inputs(model)
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


def run_stage(model, name, batch, layers, feeds):
    program = TorchProgram(build_stage_program(model, name, batch, layers), float_dtype=torch.float64)
    with torch.no_grad():
        return program.run({v.name: feeds[v.name] for v in program.program.inputs})


@pytest.mark.parametrize("kind", ["adam-peer", "sgd-no-peer", "unsupervised-local"])
@pytest.mark.parametrize("stages,micro", [(2, (2, 4)), (3, (3, 3)), (3, (6,))], ids=["2-stages", "3-stages", "3-stages-1-micro"])
def test_pipeline_stages_streamed_then_applied_equal_the_whole_batch_step(kind, stages, micro):
    """The stage programs of layer-pipelined training, run by hand in stage order on micro-batches
    (what ``PipelineStep`` does across processes): the neutral pass up to the readout's stage,
    negative labels back to stage 0, the [pos; neg] rows through every stage, each stage's
    micro-batch sums applied to its own parameters: the one-process train_step."""
    model = model_of(kind)
    params, state, rows, schedule = random_step_inputs(model)
    whole = run(model, "train_step", BATCH, {**params, **state, **rows, **schedule})
    split = pipeline_stages(model, stages)
    assert [layers.start for layers in split] == sorted({layers.start for layers in split}) and split[-1].stop == 3
    got, negatives = {}, {}
    for phase in ("stage_neutral", "stage_posneg"):
        start, streams, totals = 0, {}, [{} for _ in split]
        for size in micro:
            feeds = {**params, **{k: v[start:start + size] for k, v in rows.items()}}
            for r, layers in enumerate(split):
                if phase == "stage_neutral" and not runs_neutral_pass(model, layers):
                    break
                out = run_stage(model, phase, size, layers, {**feeds, **streams, **negatives.get(start, {})})
                streams = {k.replace(".out", ".in"): v for k, v in out.items() if k.endswith(".out")}
                if "negative_labels" in out:
                    negatives[start] = {"negative_labels": out["negative_labels"]}
                for k, v in out.items():
                    if not k.endswith(".out") and k != "negative_labels":
                        totals[r][k] = totals[r][k] + v if k in totals[r] else v
            start += size
        if phase == "stage_neutral":
            neutral = totals
    for r, layers in enumerate(split):
        summed = {**neutral[r], **totals[r]}
        applied = run_stage(model, "stage_apply", BATCH, layers, {**params, **state, **summed, **schedule})
        assert {k[4:] for k in applied if k.startswith("new.")} == stage_params(model, layers) | stage_state(model, layers)
        for name, value in applied.items():
            got[name] = value
        for name, value in summed.items():
            got.setdefault(name, value)
    checked = 0
    for name, want in whole.items():
        if name == "negative_labels":
            continue
        scale = max(float((want - (params | state).get(name[4:], 0)).abs().max()) if name.startswith("new.") else
                    float(want.abs().max()), 1e-12)
        assert float((got[name] - want).abs().max()) <= 1e-12 * scale, name
        checked += 1
    assert checked == len(whole) - ("negative_labels" in whole)
