"""Locally connected layers (footnote 8): connectivity, the blocked lowering against the masked
dense definition (footnote 13), peer normalization on them (footnote 9), and spec validation."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from ffcompile.reference.interpreter import TorchProgram
from ffcompile.lowering import build_program, init_state, local
from ffcompile.lowering.layer import forward, peer_normalization
from ffcompile.core.builder import Builder
from ffcompile.core.spec import SpecError, load_model, model_from_dict

REPO = Path(__file__).parents[2]
PAPER = load_model(REPO / "models" / "mnist-local.toml")


def small_local_model(**changes):
    """The paper's geometry with few channels, so programs run in milliseconds."""
    channels = (3, 4, 5)
    layers = tuple(dataclasses.replace(layer, channels=c) for layer, c in zip(PAPER.layers, channels))
    return dataclasses.replace(PAPER, layers=layers, training=dataclasses.replace(PAPER.training, batch_size=4),
                               **changes)


def run(program, feeds):
    return TorchProgram(program).run_numpy(feeds)


def test_paper_architecture_sizes_and_fields():
    geos = [local.geometry(PAPER, i) for i in range(3)]
    assert [layer.size for layer in PAPER.layers] == [2048, 1980, 2048]  # "approximately 2000 hidden units per layer"
    assert [g.window for g in geos] == [100, 4 * 128, 4 * 220]
    assert [g.dense_fan_in for g in geos] == [784, 2048, 1980]
    assert [local.weight_shape(PAPER, i) for i in range(3)] == [(2048, 100), (1980, 512), (2048, 880)]


@pytest.mark.parametrize("i", range(3))
def test_mask_has_one_receptive_field_per_unit(i):
    mask = local.local_mask(PAPER, i)
    geo = local.geometry(PAPER, i)
    assert set(np.unique(mask)) == {0.0, 1.0}
    assert np.all(mask.sum(1) == geo.field * geo.field * geo.below_channels)
    # units of one location share a window; units of different locations do not
    per_location = mask.reshape(geo.locations, geo.channels, -1)
    assert np.all(per_location == per_location[:, :1])
    assert len({per_location[k, 0].tobytes() for k in range(geo.locations)}) == geo.locations


def test_first_layer_windows_are_pixel_squares_at_stride_6():
    mask = local.local_mask(PAPER, 0).reshape(16, 128, 28, 28)
    for gy in range(4):
        for gx in range(4):
            want = np.zeros((28, 28))
            want[6 * gy:6 * gy + 10, 6 * gx:6 * gx + 10] = 1
            assert np.array_equal(mask[4 * gy + gx, 0], want), (gy, gx)


def test_later_layer_windows_take_all_channels_of_2x2_grid_points():
    mask = local.local_mask(PAPER, 1).reshape(3, 3, 220, 4, 4, 128)
    want = np.zeros((4, 4, 128))
    want[1:3, 0:2, :] = 1  # grid point (1, 0) of h2 sees h1's points (1..2, 0..1), every channel
    assert np.array_equal(mask[1, 0, 7], want)


def test_compact_and_dense_layouts_round_trip():
    model = small_local_model()
    rng = np.random.default_rng(0)
    for i in range(3):
        compact = rng.normal(size=local.weight_shape(model, i, "blocked"))
        dense = local.dense_weight(model, i, compact)
        assert np.array_equal(dense != 0, local.local_mask(model, i) != 0)
        assert np.array_equal(local.compact_weight(model, i, dense), compact)


def test_initial_weights_are_zero_off_the_mask_in_the_dense_form():
    model = small_local_model()
    compact, _ = init_state(model, seed=3)
    with local.lowering_form("masked_dense"):
        dense, _ = init_state(model, seed=3)
    for i, layer in enumerate(model.layers):
        w = dense[f"{layer.name}.weight"]
        assert np.all(w[local.local_mask(model, i) == 0] == 0)
        assert np.array_equal(local.compact_weight(model, i, w), compact[f"{layer.name}.weight"])


@pytest.mark.parametrize("i", range(3))
def test_blocked_forward_equals_masked_dense_definition(i):
    model = small_local_model()
    rng = np.random.default_rng(i)
    geo = local.geometry(model, i)
    x = rng.normal(size=(5, geo.dense_fan_in))
    compact = rng.normal(size=local.weight_shape(model, i, "blocked"))
    bias = rng.normal(size=model.layers[i].size)
    b = Builder("forward")
    name = model.layers[i].name
    params = {f"{name}.weight": b.input(f"{name}.weight", compact.shape), f"{name}.bias": b.input(f"{name}.bias", bias.shape)}
    z, _ = forward(b, b.input("x", x.shape), params, model, i)
    b.output("z", z)
    got = run(b.build(), {"x": x, f"{name}.weight": compact, f"{name}.bias": bias})["z"]
    np.testing.assert_allclose(got, x @ local.dense_weight(model, i, compact).T + bias, rtol=1e-12, atol=1e-12)


def _step_feeds(model, rng, dense: bool):
    params, state = init_state(model, seed=1)
    params = {k: v + rng.normal(0, 0.1, v.shape) for k, v in params.items()}  # float64, nonzero biases/readout
    state = {k: np.abs(rng.normal(0, 0.05, v.shape)) for k, v in state.items()}
    if dense:
        to_dense = lambda k, v: local.dense_weight(model, model.layer_index(k.split(".")[0]), v) \
            if k.split(".")[1] == "weight" and not k.startswith("softmax") else v
        params = {k: to_dense(k, v) for k, v in params.items()}
        state = {k: to_dense(k, v) for k, v in state.items()}
    batch = model.training.batch_size
    x = rng.random((batch, 784))
    return {**params, **state, "x": x, "x_other": x[::-1].copy(), "y": rng.integers(0, 10, batch),
            "mask_bits": rng.integers(0, 2, (batch, 784)).astype(np.float64), "lr": np.float64(0.01), "step": np.float64(3)}


def test_blocked_train_step_equals_masked_dense_train_step():
    """The whole step (local rule, peer normalization, weight decay, Adam) in both layouts; the
    masked dense weights and their Adam slots stay exactly zero off the connectivity."""
    model = small_local_model()
    out = {}
    for form in local.FORMS:
        with local.lowering_form(form):
            program = build_program(model, "train_step", model.training.batch_size)
        feeds = _step_feeds(model, np.random.default_rng(5), dense=form == "masked_dense")
        out[form] = run(program, {v.name: feeds[v.name] for v in program.inputs})
    for i, layer in enumerate(model.layers):
        mask = local.local_mask(model, i)
        for suffix in ("weight", "weight.m", "weight.v"):
            dense = out["masked_dense"][f"new.{layer.name}.{suffix}"]
            assert np.all(dense[mask == 0] == 0), suffix
            np.testing.assert_allclose(local.compact_weight(model, i, dense), out["blocked"][f"new.{layer.name}.{suffix}"],
                                       rtol=1e-10, atol=1e-14)
    for name in ("new.softmax.weight", "loss.h3", "loss_peer.h2", "new.h1.peer_mean"):
        np.testing.assert_allclose(out["blocked"][name], out["masked_dense"][name], rtol=1e-10)


@pytest.mark.parametrize("i", range(3))
def test_peer_norm_gradient_on_local_layer_matches_its_definition(i):
    """Footnote 9 on a local layer: dW of weight * mean_j (m_j - mean m)^2 with the ReLU's
    derivative pretended to be 1, by autograd through the masked dense weights."""
    model = small_local_model()
    peer = model.regularizers.peer_norm
    rng = np.random.default_rng(10 + i)
    geo = local.geometry(model, i)
    units = model.layers[i].size
    x = rng.normal(size=(6, geo.dense_fan_in))
    compact = rng.normal(size=local.weight_shape(model, i, "blocked"))
    old_mean = np.abs(rng.normal(size=units))
    b = Builder("peer")
    name = model.layers[i].name
    params = {f"{name}.weight": b.input(f"{name}.weight", compact.shape), f"{name}.bias": b.input(f"{name}.bias", (units,))}
    xv = b.input("x", x.shape)
    _, y = forward(b, xv, params, model, i)
    _, dw, db, _ = peer_normalization(b, b.reduce_sum(xv, [0], keepdims=True), b.reduce_sum(y, [0]),
                                      b.input("old_mean", (units,)), model, i, x.shape[0])
    b.output("dw", dw)
    b.output("db", db)
    got = run(b.build(), {"x": x, f"{name}.weight": compact, f"{name}.bias": np.zeros(units), "old_mean": old_mean})

    w = torch.tensor(local.dense_weight(model, i, compact), requires_grad=True)
    bias = torch.zeros(units, dtype=torch.float64, requires_grad=True)
    z = torch.tensor(x) @ (w * torch.tensor(local.local_mask(model, i), dtype=torch.float64)).T + bias
    pretend = z + (torch.relu(z) - z).detach()
    mean = peer.momentum * torch.tensor(old_mean) + (1 - peer.momentum) * pretend.mean(0)
    (peer.weight * ((mean - mean.mean()) ** 2).mean()).backward()
    # relative to the largest entry: the program's constants (1 / units, the coefficient) are fp32
    want_dw = local.compact_weight(model, i, w.grad.numpy())
    np.testing.assert_allclose(got["dw"], want_dw, rtol=0, atol=1e-6 * np.abs(want_dw).max())
    np.testing.assert_allclose(got["db"], bias.grad.numpy(), rtol=0, atol=1e-6 * np.abs(bias.grad.numpy()).max())
    assert np.all(w.grad.numpy()[local.local_mask(model, i) == 0] == 0)


def _local_spec(layers):
    return {"name": "t", "input": {"label": {"kind": "none"}}, "negatives": {"kind": "hybrid_image"},
            "layers": layers, "readout": {"softmax_layers": [layers[-1].get("name", f"h{len(layers)}")]}}


def test_paper_local_architecture_validates():
    layers = [{"kind": "local", "grid": 4, "stride": 6, "field": 10, "channels": 128},
              {"kind": "local", "grid": 3, "stride": 1, "field": 2, "channels": 220},
              {"kind": "local", "grid": 2, "stride": 1, "field": 2, "channels": 512}]
    model = model_from_dict(_local_spec(layers))
    assert [layer.size for layer in model.layers] == [2048, 1980, 2048]


@pytest.mark.parametrize("layers,where", [
    # stride 7: the 4x4 grid spans 3 * 7 + 10 = 31 pixels of a 28-pixel image
    ([{"kind": "local", "grid": 4, "stride": 7, "field": 10, "channels": 8}], "layers[0] (h1).field"),
    # a 3x3 grid with 3x3 fields over the 4x4 grid below spans 5 points
    ([{"kind": "local", "grid": 4, "stride": 6, "field": 10, "channels": 8},
      {"kind": "local", "grid": 3, "stride": 1, "field": 3, "channels": 8}], "layers[1] (h2).field"),
    ([{"size": 20}, {"kind": "local", "grid": 2, "stride": 1, "field": 2, "channels": 8}], "layers[1] (h2).kind"),
])
def test_inconsistent_local_geometry_names_the_layer(layers, where):
    with pytest.raises(SpecError, match=r"^<dict>: " + where.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
                       .replace(")", r"\)")):
        model_from_dict(_local_spec(layers))
