"""The FF IR: TOML loading, JSON round trip, and validation errors that name file and field."""

import json
from pathlib import Path

import pytest

from ffcompile.core.spec import LocalLayer, SpecError, load_model, model_from_dict, model_from_json

MODELS = sorted((Path(__file__).parents[2] / "models").glob("*.toml"))


@pytest.mark.parametrize("path", MODELS, ids=[p.stem for p in MODELS])
def test_shipped_specs_load_and_round_trip(path):
    model = load_model(path)
    again = model_from_json(model.dumps())
    assert again == model
    assert json.loads(again.dumps()) == json.loads(model.dumps())


def test_thresholds_default_to_width():
    model = load_model(Path(__file__).parents[2] / "models" / "mnist-supervised.toml")
    assert [model.threshold(i) for i in range(4)] == [2000.0] * 4


def base() -> dict:
    return {
        "name": "t",
        "layers": [{"size": 20}, {"size": 10}],
        "readout": {"goodness_layers": ["h2"], "softmax_layers": ["h2"]},
    }


def error_of(raw, tmp_path, name="bad.toml") -> str:
    path = tmp_path / name
    path.write_text(raw)
    with pytest.raises(SpecError) as e:
        load_model(path)
    message = str(e.value)
    assert "\n" not in message
    assert str(path) in message
    return message


@pytest.mark.parametrize("toml_text,needle", [
    ('name = "x"\n[[layers]]\nkind = "conv"\nsize = 3\n', "layers[0].kind: unknown layer kind 'conv'"),
    ('name = "x"\n[[layers]]\nsize = -3\n', "layers[0] (h1).size: must be a positive integer, got -3"),
    ('name = "x"\n[[layers]]\nsize = 3\nthreshold = -1.0\n', "threshold: must be >= 0"),
    ('name = "x"\n[[layers]]\nsize = 3\n[goodness]\nthreshold_per_unit = -2\n', "goodness.threshold_per_unit: must be >= 0"),
    ('name = "x"\n[[layers]]\nsize = 3\n[goodness]\nkind = "cube"\n', "goodness.kind: unknown value 'cube'"),
    ('name = "x"\n[[layers]]\nsize = 3\n[optimizer]\nlr = "fast"\n', "optimizer.lr: must be a number"),
    ('name = "x"\n[[layers]]\nsize = 3\n[optimizer]\nmomentum = 1.5\n', "optimizer.momentum: must be in [0, 1)"),
    ('name = "x"\n[[layers]]\nsize = 3\n[optimiser]\nlr = 1\n', "optimiser: unknown section"),
    ('name = "x"\n[[layers]]\nsize = 3\nwidth = 3\n', "layers[0].width: unknown field"),
    ('name = "x"\n[[layers]]\nsize = 3\n[readout]\ngoodness_layers = ["h9"]\n', "readout.goodness_layers[0]: no layer named 'h9'"),
    ('name = "x"\n[[layers]]\nsize = 3\n[negatives]\nkind = "hard_label"\n[readout]\ngoodness_layers = ["h1"]\n',
     "negatives.kind: \"hard_label\" samples from the softmax readout: set readout.softmax_layers"),
    ('name = "x"\n[input]\nlabel = { kind = "none" }\n[[layers]]\nsize = 3\n[negatives]\nkind = "random_label"\n',
     "negatives.kind: 'random_label' needs labels in the input"),
    ('name = "x"\n[[layers]]\nsize = 3\n[goodness]\nkind = "sum"\n', "footnote 21"),
    ('name = "x"\n[[layers]]\nkind = "local"\ngrid = 4\nstride = 6\nfield = 12\nchannels = 8\n',
     "layers[0] (h1).field: grid 4 x stride 6 with field 12 spans 30 pixels, but the layer below has only 28"),
    ('name = "x"\n[[layers]]\nsize = 3\n[[layers]]\nkind = "local"\ngrid = 2\nstride = 1\nfield = 2\nchannels = 8\n',
     "layers[1] (h2).kind: a local layer must follow the input or another local layer"),
    ('name = "x"\n[[layers]]\nsize = 3\n[input]\nsize = 100\n', "input.image_shape: [28, 28] does not have input.size = 100"),
    ('name = "x"\nlayers = [\n', "not valid TOML"),
    ('name = "x"\n', "layers: at least one [[layers]] entry is required"),
])
def test_validation_errors_name_the_field(tmp_path, toml_text, needle):
    assert needle in error_of(toml_text, tmp_path)


def test_paper_local_architecture_validates():
    raw = base()
    raw["layers"] = [
        {"kind": "local", "grid": 4, "stride": 6, "field": 10, "channels": 128},
        {"kind": "local", "grid": 3, "stride": 1, "field": 2, "channels": 220},
        {"kind": "local", "grid": 2, "stride": 1, "field": 2, "channels": 512},
    ]
    raw["readout"] = {"softmax_layers": ["h2", "h3"]}
    raw["input"] = {"label": {"kind": "none"}}
    raw["negatives"] = {"kind": "hybrid_image"}
    model = model_from_dict(raw)
    assert [layer.size for layer in model.layers] == [2048, 1980, 2048]  # "approximately 2000" (footnote 8)
    assert isinstance(model.layers[0], LocalLayer)


def test_missing_file_error(tmp_path):
    with pytest.raises(SpecError, match="model spec not found"):
        load_model(tmp_path / "nope.toml")


def test_duplicate_layer_names_rejected():
    raw = base()
    raw["layers"] = [{"name": "a", "size": 3}, {"name": "a", "size": 3}]
    raw["readout"] = {}
    with pytest.raises(SpecError, match="duplicate layer name 'a'"):
        model_from_dict(raw)


GROUPED = 'name = "x"\n[[layers]]\nsize = 3\n[readout]\nsoftmax_layers = ["h1"]\n'


@pytest.mark.parametrize("toml_text,needle", [
    (GROUPED + '[[optimizer.groups]]\nparams = ["sofmax"]\nlr = 0.1\n',
     "optimizer.groups[0].params[0]: 'sofmax' matches no parameter (parameters: h1.weight, h1.bias, softmax.weight"),
    (GROUPED + '[[optimizer.groups]]\nparams = ["softmax"]\nlr = -0.1\n', "optimizer.groups[0].lr: must be a finite number >= 0, got -0.1"),
    (GROUPED + '[[optimizer.groups]]\nparams = ["h1"]\nweight_decay = nan\n', "optimizer.groups[0].weight_decay: must be a finite number >= 0"),
    (GROUPED + '[[optimizer.groups]]\nparams = ["h1"]\n[[optimizer.groups]]\nparams = ["h1.bias"]\n',
     "optimizer.groups[1].params[0]: 'h1.bias' is already in optimizer.groups[0]"),
    (GROUPED + '[[optimizer.groups]]\nlr = 0.1\n', "optimizer.groups[0].params: list at least one parameter or layer name"),
    (GROUPED + '[[optimizer.groups]]\nparams = ["h1"]\nrate = 0.1\n', "optimizer.groups[0].rate: unknown field"),
    (GROUPED + '[optimizer]\ndampening = 1.0\n', "optimizer.dampening: must be in [0, 1)"),
    (GROUPED + '[regularizers]\npeer_norm = { form = "strong" }\n', "regularizers.peer_norm.form: unknown value 'strong'"),
    (GROUPED + '[initialization]\nkind = "xavier"\n', "initialization.kind: unknown value 'xavier'"),
])
def test_recipe_fields_are_validated(tmp_path, toml_text, needle):
    assert needle in error_of(toml_text, tmp_path)


def test_param_groups_select_parameters_by_name_or_layer():
    model = load_model(Path(__file__).parents[2] / "models" / "mnist-ffcode.toml")
    assert model.param_group("softmax.weight").lr == 0.1
    assert model.param_group("softmax.bias").lr == 0.0
    assert model.param_group("h1.weight") is None


def test_normal_initialization_statistics():
    import numpy as np

    from ffcompile.lowering import init_state

    model = load_model(Path(__file__).parents[2] / "models" / "mnist-ffcode.toml")
    params, state = init_state(model, seed=0)
    w = params["h1.weight"].astype(np.float64)
    assert w.shape == (1000, 784)
    assert abs(w.mean()) < 4 / np.sqrt(w.size) / np.sqrt(784)  # 4 standard errors
    assert abs(w.std() * np.sqrt(784) - 1) < 0.01
    kurtosis = ((w - w.mean()) ** 4).mean() / w.var() ** 2
    assert abs(kurtosis - 3) < 0.05  # a normal's 3, not a uniform's 1.8
    assert not params["h1.bias"].any() and not params["softmax.weight"].any()
    assert np.all(state["h2.peer_mean"] == 0.5)
