"""The CIFAR-10 net of sec. 4 / table 1 at toy size: a recurrent net (sec. 3.4) of local layers
over a 3-channel image, with padding, top-down windows from the map above and the one-pass
softmax readout. Checked: connectivity by hand, the two local lowerings against each other, the
analytic (no-BPTT) update against the autograd oracle, the shipped specs, and ONNX parity of
every program in both lowerings."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from ffcompile.compiler.onnx_emit import to_onnx
from ffcompile.reference.interpreter import TorchProgram
from ffcompile.lowering import build_program, init_state, local, param_specs
from ffcompile.reference.oracle import oracle_recurrent_train_step
from ffcompile.runtime.ort import OrtProgram
from ffcompile.core.spec import Goodness, InputSpec, LabelEmbedding, LocalLayer, Model, Negatives, Optimizer, Readout, Recurrent, Regularizers, SpecError, Training, load_model, model_from_dict
from outputs import assert_outputs_match  # tests/outputs.py (tests/ is on sys.path via its conftest)

MODELS = Path(__file__).parents[2] / "models"
BATCH = 3
PROGRAMS = ("train_step", "infer_goodness", "infer_softmax")


def tiny(side=6, goodness="ssq", negatives="hard_label", optimizer=Optimizer(kind="sgd", lr=0.05, momentum=0.9),
         weight_decay=1e-3, iterations=3, softmax=("h1", "h2"), classes=4) -> Model:
    """side x side x 3 images; two side x side maps of 2 units per location, 3x3 fields, padding 1."""
    return Model(
        name="tiny-cifar-local",
        input=InputSpec(dataset="cifar10", size=3 * side * side, image_shape=(side, side), channels=3,
                        label=LabelEmbedding(kind="top_layer", classes=classes)),
        layers=tuple(LocalLayer(f"h{k}", grid=side, field=3, stride=1, channels=2, padding=1) for k in (1, 2)),
        goodness=Goodness(kind=goodness, threshold_per_unit=0.5),
        regularizers=Regularizers(weight_decay=weight_decay), optimizer=optimizer,
        negatives=Negatives(kind=negatives), readout=Readout(softmax_layers=softmax),
        recurrent=Recurrent(iterations=iterations, damping=0.3, readout_iterations=(2, min(3, iterations))),
        training=Training(batch_size=BATCH),
    )


def test_first_layer_windows_cover_every_colour_plane_and_stop_at_the_edge():
    model = tiny()
    mask = local.local_mask(model, 0).reshape(6, 6, 2, 3, 6, 6)  # units (y, x, c) x pixels (plane, y, x)
    want = np.zeros((3, 6, 6))
    want[:, 0:2, 2:5] = 1  # unit at (0, 3): rows -1..1 (row -1 is padding), columns 2..4, all planes
    assert np.array_equal(mask[0, 3, 1], want)
    want = np.zeros((3, 6, 6))
    want[:, 1:4, 2:5] = 1
    assert np.array_equal(mask[2, 3, 0], want)
    geo = local.geometry(model, 0)
    assert (geo.window, geo.dense_fan_in, geo.planar) == (27, 108, True)


def test_top_down_windows_mirror_the_bottom_up_windows_of_the_layer_above():
    model = tiny()
    assert np.array_equal(local.mask(local.top_down_geometry(model, 0)), local.local_mask(model, 1).T)
    specs = param_specs(model)
    assert specs["h1.top_down.weight"] == (72, 18) and specs["h2.top_down.weight"] == (72, 4)  # label: dense


def test_padding_weights_start_at_zero_and_layouts_round_trip():
    model = tiny()
    params, _ = init_state(model, seed=0)
    for name, geo in (("h1.weight", local.geometry(model, 0)), ("h2.weight", local.geometry(model, 1)),
                      ("h1.top_down.weight", local.top_down_geometry(model, 0))):
        compact = params[name]
        assert compact.shape == (geo.units, geo.window)
        dense = local.to_dense(geo, compact)
        assert np.array_equal(dense != 0, local.mask(geo) != 0), name
        assert np.array_equal(local.to_compact(geo, dense), compact), name


def test_large_maps_are_lowered_masked_dense_small_ones_blocked():
    assert local.form(local.geometry(tiny(side=8), 0)) == "blocked"
    big = load_model(MODELS / "cifar-local-2.toml")
    geo = local.geometry(big, 0)
    assert local.form(geo) == "masked_dense"
    assert param_specs(big)["h1.weight"] == (3072, 3072) and param_specs(big)["h1.top_down.weight"] == (3072, 3072)
    assert int(local.mask(geo).sum(1).max()) == 363  # sec. 4: 11 x 11 x 3 bottom-up inputs
    assert int(local.mask(local.top_down_geometry(big, 0)).sum(1).max()) == 363
    assert param_specs(big)["h2.top_down.weight"] == (3072, 10)


def to_form(model, arrays: dict, form: str) -> dict:
    """Compact (blocked) parameters/state -> the given form's layout."""
    if form == "blocked":
        return dict(arrays)
    out = {}
    for key, value in arrays.items():
        geo = _geometry_of(model, key)
        out[key] = local.to_dense(geo, value) if geo is not None else value
    return out


def _geometry_of(model, key: str):
    name, rest = key.split(".", 1)
    if name == "softmax" or "weight" not in rest:
        return None
    i = model.layer_index(name)
    if rest.startswith("top_down.weight"):
        return local.top_down_geometry(model, i) if local.has_local_top_down(model, i) else None
    return local.geometry(model, i)


def run64(program, feeds: dict) -> dict:
    """The torch reference in float64 (constants and one-of-N rows too)."""
    return TorchProgram(program, float_dtype=torch.float64).run_numpy(feeds)


def random_inputs(model, rng, dtype=np.float64):
    params, state = init_state(model, seed=2)
    with_padding_zeros = lambda k, v: v * (local.to_compact(_geometry_of(model, k), local.to_dense(
        _geometry_of(model, k), np.ones_like(v))) if _geometry_of(model, k) else 1)
    params = {k: with_padding_zeros(k, v + rng.normal(0, 0.2, v.shape)).astype(dtype) for k, v in params.items()}
    state = {k: with_padding_zeros(k, np.abs(rng.normal(0, 0.05, v.shape))).astype(dtype) for k, v in state.items()}
    feeds = {"x": rng.random((BATCH, model.input.size)).astype(dtype),
             "y": rng.integers(0, model.input.label.classes, BATCH), "u": rng.random(BATCH).astype(dtype),
             "lr": np.asarray(0.01, dtype), "step": np.asarray(3.0, dtype)}
    return params, state, feeds


@pytest.mark.parametrize("program_name", PROGRAMS)
def test_blocked_and_masked_dense_programs_agree(program_name):
    model = tiny(goodness="neg_ssq", optimizer=Optimizer(kind="adam", lr=0.01))
    params, state, feeds = random_inputs(model, np.random.default_rng(4))
    out = {}
    for form in local.FORMS:
        with local.lowering_form(form):
            program = build_program(model, program_name, BATCH)
        all_feeds = {**to_form(model, params, form), **to_form(model, state, form), **feeds}
        out[form] = run64(program, {v.name: all_feeds[v.name] for v in program.inputs})
    for key, value in out["blocked"].items():
        other = out["masked_dense"][key]
        geo = _geometry_of(model, key[4:]) if key.startswith("new.") else None
        if geo is not None:
            assert np.all(other[local.mask(geo) == 0] == 0), key  # stays on the connectivity
            other = local.to_compact(geo, other)
        np.testing.assert_allclose(value, other, rtol=1e-10, atol=1e-12, err_msg=key)


CASES = [
    dict(),
    dict(goodness="neg_ssq", negatives="random_label", optimizer=Optimizer(kind="adam", lr=0.01), softmax=("h2",)),
    dict(weight_decay=0.0, softmax=(), iterations=2),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_analytic_update_matches_autograd_oracle(case):
    """The oracle sees dense weights times the connectivity masks (footnote 13), the program the
    compact blocked form; float64 so the tolerance measures math, not rounding."""
    model = tiny(**CASES[case])
    params, state, feeds = random_inputs(model, np.random.default_rng(10 + case))
    program = build_program(model, "train_step", BATCH)
    tensors = {k: torch.tensor(v) for k, v in {**params, **state, **feeds}.items()}
    out = run64(program, {v.name: {**params, **state, **feeds}[v.name] for v in program.inputs})

    geos = {k: _geometry_of(model, k) for k in params}
    geo_of = lambda key: geos.get(key) or geos.get(key.rsplit(".", 1)[0])  # a parameter or its optimizer slot
    dense = lambda d: {k: torch.tensor(local.to_dense(geo_of(k), v) if geo_of(k) else v) for k, v in d.items()}
    masks = {k: torch.tensor(local.mask(g), dtype=torch.float64) for k, g in geos.items() if g is not None}
    want_params, want_state, negatives = oracle_recurrent_train_step(
        model, dense(params), dense(state), tensors["x"], tensors["y"], tensors["u"], 0.01, 3, masks=masks)
    assert np.array_equal(out["negative_labels"], negatives.numpy())
    assert ("softmax.weight" in want_params) == bool(model.readout.softmax_layers)
    for name, want in {**want_params, **want_state}.items():
        geo = geo_of(name)
        want = want.numpy()
        if geo is not None:
            assert np.all(want[local.mask(geo) == 0] == 0), name
            want = local.to_compact(geo, want)
        start = params.get(name, 0.0)
        scale = max(float(np.abs(want - start).max()), 1e-12) if name in params else max(float(np.abs(want).max()), 1e-12)
        err = float(np.abs(out[f"new.{name}"] - want).max())
        assert err <= 1e-6 * scale, f"{name}: max abs err {err:.3g} vs scale {scale:.3g}"


def test_one_pass_softmax_sees_only_the_bottom_up_pass():
    """infer_softmax is a linear softmax on the normalized iteration-0 states: independent of the
    top-down weights, and equal to the states program's t = 0 output put through it by hand."""
    model = tiny()
    params, _, feeds = random_inputs(model, np.random.default_rng(3), np.float32)
    run = lambda name, p: TorchProgram(build_program(model, name, BATCH)).run_numpy(
        {v.name: {**p, **feeds}[v.name] for v in build_program(model, name, BATCH).inputs})
    probs = run("infer_softmax", params)["probs"]
    states = run("recurrent_states", params)
    rms = lambda v: v / np.sqrt((v * v).mean(1, keepdims=True) + 1e-8)
    features = np.concatenate([rms(states["state.h1.0"]), rms(states["state.h2.0"])], axis=1)
    logits = features @ params["softmax.weight"].T + params["softmax.bias"]
    want = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(probs, want / want.sum(1, keepdims=True), rtol=1e-4, atol=1e-6)
    scrambled = {**params, "h1.top_down.weight": params["h1.top_down.weight"] * 0 + 1}
    np.testing.assert_array_equal(run("infer_softmax", scrambled)["probs"], probs)


@pytest.mark.parametrize("form", local.FORMS)
@pytest.mark.parametrize("program_name", PROGRAMS)
def test_onnx_program_matches_torch_reference(program_name, form):
    model = tiny(side=4)
    params, state, feeds = random_inputs(model, np.random.default_rng(5), np.float32)
    feeds["y"] = feeds["y"].astype(np.int64)
    with local.lowering_form(form):
        program = build_program(model, program_name, BATCH)
    all_feeds = {**to_form(model, params, form), **to_form(model, state, form), **feeds}
    all_feeds = {v.name: all_feeds[v.name] for v in program.inputs}
    want = TorchProgram(program).run_numpy(all_feeds)
    got = OrtProgram(to_onnx(program).SerializeToString(), name=program_name).run(all_feeds)
    assert_outputs_match(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["cifar-local-2", "cifar-local-3"])
def test_shipped_specs_are_table_1_nets(name):
    model = load_model(MODELS / f"{name}.toml")
    assert model.input.dataset == "cifar10" and (model.input.size, model.input.channels) == (3072, 3)
    assert len(model.layers) == int(name[-1])
    for layer in model.layers:  # sec. 4: 32 x 32 maps, 3 units per location, 11 x 11 fields
        assert (layer.grid, layer.channels, layer.field, layer.stride, layer.padding, layer.size) == (32, 3, 11, 1, 5, 3072)
    assert (model.recurrent.iterations, model.recurrent.readout_iterations) == (10, (4, 6))
    assert model.regularizers.weight_decay > 0 and model.readout.softmax_layers


def _spec(**changes):
    raw = {"name": "t", "input": {"dataset": "cifar10", "size": 3072, "image_shape": [32, 32], "channels": 3,
                                  "label": {"kind": "top_layer"}},
           "layers": [{"kind": "local", "grid": 32, "field": 11, "stride": 1, "padding": 5, "channels": 3},
                      {"kind": "local", "grid": 32, "field": 11, "stride": 1, "padding": 5, "channels": 3}],
           "recurrent": {"iterations": 10, "readout_iterations": [4, 6]}}
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if section == "layers":
            raw["layers"][1][field] = value
        else:
            raw[section][field] = value
    return raw


@pytest.mark.parametrize("changes,message", [
    ({"input__channels": 1}, r"input.image_shape: \[32, 32\] does not have input.size = 3072"),
    ({"layers__padding": 4}, r"layers\[1\] \(h2\).field: grid 32 x stride 1 with field 11 spans 42 grid points, "
                             r"but the layer below has only 32 \(\+ 2 x padding 4\)"),
    ({"layers__padding": 11}, r"layers\[1\] \(h2\).padding: must be in \[0, field - 1 = 10\]"),
    ({"layers__grid": 16, "layers__stride": 2}, r"layers\[1\] \(h2\).grid: in a recurrent net a local layer above"),
])
def test_inconsistent_geometry_is_one_error_naming_the_layer(changes, message):
    model_from_dict(_spec())  # the paper's net validates
    with pytest.raises(SpecError, match=r"^<dict>: " + message):
        model_from_dict(_spec(**changes))
