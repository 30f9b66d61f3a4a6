"""Spec values that load but would crash, hang or eat memory later are refused up front, in one
line naming the field (and, for caps, the cap and why)."""

import json
from pathlib import Path

import pytest

from cli_helpers import error_line, invoke  # tests/cli_helpers.py

TINY = (Path(__file__).parent / "bundle" / "tiny.toml").read_text()


def spec(tmp_path, old, new, text=TINY):
    assert old in text
    path = tmp_path / "spec.toml"
    path.write_text(text.replace(old, new, 1))
    return path


CASES = [
    ("lr = 0.001", "lr = nan", "optimizer.lr", "finite"),
    ("lr = 0.001", "lr = inf", "optimizer.lr", "finite"),
    ("lr = 0.001", "lr = 0.001\neps = 0.0", "optimizer.eps", "> 0"),
    ("lr = 0.001", "lr = 0.001\neps = -1e-8", "optimizer.eps", "> 0"),
    ("lr = 0.001", "lr = 0.001\nbeta1 = 0.0", "optimizer.beta1", "(0, 1)"),
    ("lr = 0.001", "lr = 0.001\nbeta2 = 0.0", "optimizer.beta2", "(0, 1)"),
    ("lr = 0.001", "lr = 0.001\nbeta2 = nan", "optimizer.beta2", "got nan"),
    ("epochs = 2", "epochs = 2\n[goodness]\nthreshold_per_unit = nan", "goodness.threshold_per_unit", "finite"),
    ("epochs = 2", "epochs = 2\n[normalization]\neps = inf", "normalization.eps", "finite"),
    ("size = 32", "size = 32\nthreshold = inf", "layers[0]", "finite"),
    ('name = "h2"', 'name = "softmax"', "layers[1]", "reserved"),
    ('name = "h2"', 'name = "a.b"', "layers[1]", "letters, digits"),
    ("size = 32", "size = 100000000", "layers[0]", "at most"),
    ('kind = "hard_label"', 'kind = "hard_label"\nblur_passes = 1000000000', "negatives.blur_passes", "at most"),
    ('kind = "hard_label"', 'kind = "hard_label"\nblur_passes = -1', "negatives.blur_passes", ">= 0"),
    ('kind = "hard_label"', 'kind = "hard_label"\nmin_prob = 0.0', "negatives.min_prob", "(0, 1)"),
    ("epochs = 2", "epochs = 2\nseed = -1", "training.seed", "0.."),
    ("batch_size = 20", "batch_size = 100000000", "training.batch_size", "at most"),
    ("epochs = 2", "epochs = 1000000000000", "training.epochs", "at most"),
    ("epochs = 2", "epochs = 2\njitter = 1000", "training.jitter", "at most"),
    ("size = 784", "size = 784\nimage_shape = [-28, -28]", "input.image_shape", "positive"),
]


@pytest.mark.parametrize("old,new,field,phrase", CASES, ids=[c[1].splitlines()[-1] for c in CASES])
def test_bad_values_refused_in_one_line(tmp_path, old, new, field, phrase):
    line = error_line(invoke("inspect", spec(tmp_path, old, new)))
    assert field in line and phrase in line, line


def test_recurrent_iterations_capped(tmp_path):
    text = (TINY.replace("peer_norm = { weight = 0.03, momentum = 0.9 }", "")
            .replace("size = 784", 'size = 784\nlabel = { kind = "top_layer" }')
            .replace("epochs = 2", "epochs = 2\n[recurrent]\niterations = 100000000\nreadout_iterations = [1, 2]"))
    line = error_line(invoke("inspect", spec(tmp_path, "size = 784", "size = 784", text)))
    assert "recurrent.iterations" in line and "at most" in line, line


def test_deeply_nested_toml_and_json_refused(tmp_path):
    deep = tmp_path / "deep.toml"
    deep.write_text("x = " + "[" * 100000 + "]" * 100000 + "\n")
    assert "deep.toml" in error_line(invoke("inspect", deep))
    deep_json = tmp_path / "deep.json"
    deep_json.write_text("[" * 100000 + "]" * 100000)
    assert "deep.json" in error_line(invoke("inspect", deep_json))


def test_huge_integers_refused(tmp_path):
    big = tmp_path / "big.json"
    big.write_text('{"name": "x", "layers": [{"size": ' + "9" * 5000 + "}]}")
    assert "big.json" in error_line(invoke("inspect", big))
    big_toml = spec(tmp_path, "size = 32", "size = 9223372036854775807")
    assert "at most" in error_line(invoke("inspect", big_toml))


def test_json_spec_nan_refused(tmp_path):
    path = tmp_path / "nan.json"
    raw = {"name": "x", "layers": [{"size": 8}], "negatives": {"kind": "random_label"},
           "goodness": {"threshold_per_unit": float("nan")}}
    path.write_text(json.dumps(raw))
    line = error_line(invoke("inspect", path))
    assert "nan.json" in line and ("finite" in line or "NaN" in line), line
