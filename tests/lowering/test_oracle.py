"""Analytic local gradients (the lowering) against the autograd oracle, for every goodness,
normalization, regularizer, optimizer and negative-label combination. Both run in float64 so the
1e-6 relative tolerance measures the math, not fp32 rounding."""

import dataclasses

import numpy as np
import pytest
import torch

from ffcompile.reference.interpreter import TorchProgram
from ffcompile.lowering import build_program, init_state, local
from ffcompile.reference.oracle import oracle_train_step
from ffcompile.core.spec import (DenseLayer, Goodness, InputSpec, LabelEmbedding, LocalLayer, Model, Negatives,
                                 Normalization, Optimizer, ParamGroup, PeerNorm, Readout, Regularizers, Training)

GOODNESS = [("ssq", "rms"), ("ssq", "l2"), ("neg_ssq", "rms"), ("sum", "l1")]
REGULARIZERS = [Regularizers(), Regularizers(weight_decay=1e-2, peer_norm=PeerNorm(weight=0.5, momentum=0.8))]
OPTIMIZERS = [Optimizer(kind="sgd", lr=0.05, momentum=0.9), Optimizer(kind="adam", lr=0.01)]
NEGATIVES = ["hard_label", "random_label"]


def tiny_model(goodness, norm, regularizers, optimizer, negatives, normalize_input=True) -> Model:
    return Model(
        name="tiny",
        input=InputSpec(size=64, image_shape=(8, 8), normalize=normalize_input),
        layers=(DenseLayer("h1", 12), DenseLayer("h2", 9), DenseLayer("h3", 7)),
        normalization=Normalization(kind=norm),
        goodness=Goodness(kind=goodness, threshold_per_unit=0.5),
        regularizers=regularizers, optimizer=optimizer, negatives=Negatives(kind=negatives),
        readout=Readout(goodness_layers=("h2", "h3"), softmax_layers=("h2", "h3")),
        training=Training(batch_size=6),
    )


def random_step_inputs(model, rng):
    params, state = init_state(model, seed=3)
    params = {k: v + rng.normal(0, 0.1, v.shape) for k, v in params.items()}  # nonzero softmax/biases
    state = {k: np.abs(rng.normal(0, 0.05, v.shape)) for k, v in state.items()}  # Adam's v must be >= 0
    batch = model.training.batch_size
    x = rng.random((batch, model.input.size))
    y = rng.integers(0, model.input.label.classes, batch)
    u = rng.random(batch)
    t64 = lambda d: {k: torch.tensor(v, dtype=torch.float64) for k, v in d.items()}
    return t64(params), t64(state), torch.tensor(x), torch.tensor(y), torch.tensor(u)


def lowered_step(model, params, state, x, y, u, lr, step):
    """(outputs, feeds) of the lowered train_step run by the torch interpreter in float64."""
    program = TorchProgram(build_program(model, "train_step", model.training.batch_size), float_dtype=torch.float64)
    feeds = {**params, **state, "x": x, "y": y, "u": u, "lr": torch.tensor(lr, dtype=torch.float64),
             "step": torch.tensor(float(step), dtype=torch.float64)}
    with torch.no_grad():
        return program.run({v.name: feeds[v.name] for v in program.program.inputs}), feeds


@pytest.mark.parametrize("goodness,norm", GOODNESS)
@pytest.mark.parametrize("reg", range(len(REGULARIZERS)))
@pytest.mark.parametrize("opt", range(len(OPTIMIZERS)))
@pytest.mark.parametrize("negatives", NEGATIVES)
def test_analytic_update_matches_autograd(goodness, norm, reg, opt, negatives):
    model = tiny_model(goodness, norm, REGULARIZERS[reg], OPTIMIZERS[opt], negatives)
    rng = np.random.default_rng(7)
    params, state, x, y, u = random_step_inputs(model, rng)
    step, lr = 4, OPTIMIZERS[opt].lr
    out, feeds = lowered_step(model, params, state, x, y, u, lr, step)
    want_params, want_state, want_negatives = oracle_train_step(model, params, state, x, y, u, lr, step)
    assert torch.equal(out["negative_labels"], want_negatives)
    for name, want in {**want_params, **want_state}.items():
        got = out[f"new.{name}"]
        # parameters: relative to the size of their update, so a wrong update cannot hide behind large
        # weights; optimizer state: relative to its size (fp32 decay constants like 0.999 are the floor)
        reference = want - feeds[name] if name in want_params else want
        scale = max(float(reference.abs().max()), 1e-12)
        err = float((got - want).abs().max())
        assert err <= 1e-6 * scale, f"{name}: max abs err {err:.3g} vs update scale {scale:.3g}"


# Hinton's published recipe: dampened momentum ("delay"), decoupled weight decay, per-group learning
# rate and decay (a faster readout, a frozen readout bias), the direct peer-normalization pull.
GROUPS = (ParamGroup(params=("softmax.weight",), lr=0.5, weight_decay=0.03), ParamGroup(params=("softmax.bias",), lr=0.0),
          ParamGroup(params=("h2",), weight_decay=0.0))
RECIPES = {
    "sgd-dampened-decoupled-direct": (Optimizer(kind="sgd", lr=0.05, momentum=0.9, dampening=0.9, groups=GROUPS),
                                      Regularizers(weight_decay=1e-2, decoupled_weight_decay=True,
                                                   peer_norm=PeerNorm(weight=0.5, momentum=0.8, form="direct"))),
    "sgd-dampened-coupled": (Optimizer(kind="sgd", lr=0.05, momentum=0.9, dampening=0.5, groups=GROUPS),
                             Regularizers(weight_decay=1e-2)),
    "sgd-no-momentum-groups": (Optimizer(kind="sgd", lr=0.05, momentum=0.0, groups=GROUPS),
                               Regularizers(weight_decay=1e-2, decoupled_weight_decay=True)),
    "adamw-groups-loss-peer": (Optimizer(kind="adam", lr=0.01, groups=GROUPS),
                               Regularizers(weight_decay=1e-2, decoupled_weight_decay=True,
                                            peer_norm=PeerNorm(weight=0.5, momentum=0.8))),
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("zero_state", [False, True], ids=["state", "first-step"])
def test_recipe_update_matches_torch_optim(recipe, zero_state):
    """The first step (zero optimizer state) checks that dampening applies from the start, as in
    the recipe (torch.optim's SGD would otherwise start its buffer at the undampened gradient)."""
    optimizer, regularizers = RECIPES[recipe]
    model = tiny_model("ssq", "rms", regularizers, optimizer, "hard_label")
    params, state, x, y, u = random_step_inputs(model, np.random.default_rng(5))
    if zero_state:
        state = {k: torch.zeros_like(v) if not k.endswith("peer_mean") else v for k, v in state.items()}
    step, lr = 1 if zero_state else 4, optimizer.lr
    out, feeds = lowered_step(model, params, state, x, y, u, lr, step)
    want_params, want_state, _ = oracle_train_step(model, params, state, x, y, u, lr, step)
    for name, want in {**want_params, **want_state}.items():
        if name.endswith(".velocity") and optimizer.momentum == 0:
            continue  # torch.optim keeps no momentum buffer without momentum
        reference = want - feeds[name] if name in want_params else want
        scale = max(float(reference.abs().max()), 1e-12)
        err = float((out[f"new.{name}"] - want).abs().max())
        assert err <= 1e-6 * scale, f"{name}: max abs err {err:.3g} vs update scale {scale:.3g}"
    assert torch.equal(out["new.softmax.bias"], feeds["softmax.bias"])  # lr 0 freezes the group


def test_unnormalized_input_matches_autograd():
    model = tiny_model("ssq", "rms", REGULARIZERS[1], OPTIMIZERS[0], "hard_label", normalize_input=False)
    params, state, x, y, u = random_step_inputs(model, np.random.default_rng(1))
    program = TorchProgram(build_program(model, "train_step", 6), float_dtype=torch.float64)
    feeds = {**params, **state, "x": x, "y": y, "u": u, "lr": torch.tensor(0.05, dtype=torch.float64)}
    with torch.no_grad():
        out = program.run({v.name: feeds[v.name] for v in program.program.inputs})
    want_params, _, _ = oracle_train_step(model, params, state, x, y, u, 0.05, 1)
    for name, want in want_params.items():
        scale = float((want - feeds[name]).abs().max())
        assert float((out[f"new.{name}"] - want).abs().max()) <= 1e-6 * scale


# -- locally connected layers (footnotes 8, 13) and unsupervised FF with hybrid negatives (sec. 3.2)

LOCAL_LAYERS = (LocalLayer("h1", grid=3, field=4, stride=2, channels=3),   # 8x8 pixels -> 3x3 x 3
                LocalLayer("h2", grid=2, field=2, stride=1, channels=4),   # 2x2 neighbourhoods -> 2x2 x 4
                LocalLayer("h3", grid=1, field=2, stride=1, channels=5))


def tiny_variant(goodness, norm, regularizers, optimizer, *, local_layers: bool, unsupervised: bool) -> Model:
    model = tiny_model(goodness, norm, regularizers, optimizer, "hard_label")
    if local_layers:
        model = dataclasses.replace(model, layers=LOCAL_LAYERS)
    if unsupervised:
        model = dataclasses.replace(
            model, input=dataclasses.replace(model.input, label=LabelEmbedding(kind="none")),
            negatives=Negatives(kind="hybrid_image", blur_passes=2), readout=Readout(softmax_layers=("h2", "h3")))
    return model


def _to_dense(model, name, value):
    """Compact local weights (and their optimizer slots) -> the oracle's masked-dense layout."""
    i = model.layer_index(name.split(".")[0])
    if local.is_local(model, i) and name.split(".")[1] == "weight":
        return torch.tensor(local.dense_weight(model, i, value.numpy()))
    return value


# every goodness, regularizer and optimizer appears; the full cross product is covered by dense layers above
COMBINATIONS = [("ssq", "rms", 1, 1), ("neg_ssq", "rms", 0, 0), ("sum", "l1", 1, 0), ("ssq", "l2", 0, 1)]


@pytest.mark.parametrize("goodness,norm,reg,opt", COMBINATIONS)
@pytest.mark.parametrize("local_layers,unsupervised", [(True, False), (False, True), (True, True)],
                         ids=["local", "unsupervised", "local-unsupervised"])
def test_local_and_unsupervised_updates_match_autograd(goodness, norm, reg, opt, local_layers, unsupervised):
    model = tiny_variant(goodness, norm, REGULARIZERS[reg], OPTIMIZERS[opt], local_layers=local_layers,
                         unsupervised=unsupervised)
    rng = np.random.default_rng(11)
    params, state, x, y, u = random_step_inputs(model, rng)
    x_other = torch.tensor(rng.random(tuple(x.shape)))
    bits = torch.tensor(rng.integers(0, 2, tuple(x.shape)).astype(np.float64))
    step, lr = 4, OPTIMIZERS[opt].lr
    program = TorchProgram(build_program(model, "train_step", model.training.batch_size), float_dtype=torch.float64)
    feeds = {**params, **state, "x": x, "y": y, "u": u, "x_other": x_other, "mask_bits": bits,
             "lr": torch.tensor(lr, dtype=torch.float64), "step": torch.tensor(float(step), dtype=torch.float64)}
    with torch.no_grad():
        out = program.run({v.name: feeds[v.name] for v in program.program.inputs})
    masks = {layer.name: torch.tensor(local.local_mask(model, i), dtype=torch.float64)
             for i, layer in enumerate(model.layers) if local.is_local(model, i)}
    dense = lambda d: {k: _to_dense(model, k, v) if not k.startswith("softmax") and not k.endswith("peer_mean") else v
                       for k, v in d.items()}
    want_params, want_state, _ = oracle_train_step(model, dense(params), dense(state), x, y, u, lr, step,
                                                   x_other=x_other, mask_bits=bits, masks=masks)
    got = dense({k[4:]: v for k, v in out.items() if k.startswith("new.")})
    before = dense(params)
    for name, want in {**want_params, **want_state}.items():
        reference = want - before[name] if name in want_params else want
        scale = max(float(reference.abs().max()), 1e-12)
        err = float((got[name] - want).abs().max())
        assert err <= 1e-6 * scale, f"{name}: max abs err {err:.3g} vs update scale {scale:.3g}"
    for name, mask in masks.items():  # the oracle's dense weights never leave the connectivity
        assert torch.all(want_params[f"{name}.weight"][mask == 0] == 0)
