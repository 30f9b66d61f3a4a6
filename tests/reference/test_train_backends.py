"""``ffcompile train --backend``: the compiled train step in the reference's loop, parity-checked
before training, resuming bit-identically on each backend."""

import dataclasses

import numpy as np
import pytest

from ffcompile.compiler import compiled_train
from ffcompile.core.errors import FFCompileError
from ffcompile.data import load_mnist
from ffcompile.core.spec import DenseLayer, Readout, Training, load_model
from ffcompile.reference.train import Dataset, train

from cli_helpers import error_line, invoke
from test_train import SMALL


@pytest.fixture(scope="module")
def data():
    x, y = load_mnist("builtin", "train")
    xv, yv = load_mnist("builtin", "val")
    return Dataset(x[:300], y[:300], xv[:100], yv[:100], "subset")


def tiny(**training):
    model = load_model(SMALL)
    return dataclasses.replace(model, layers=(DenseLayer("h1", 24), DenseLayer("h2", 16)),
                               readout=Readout(goodness_layers=("h1", "h2"), softmax_layers=("h2",)),
                               training=Training(batch_size=50, epochs=2, seed=3, **training))


@pytest.mark.parametrize("backend", ["onnxruntime", "tvm"])
def test_resume_on_a_compiled_backend_continues_bit_identically(tmp_path, data, backend):
    model = tiny()
    quiet = dict(progress=False, log=lambda m: None, backend=backend,
                 make_step=compiled_train.compiled_steps(model, backend, data, log=lambda m: None))
    straight = train(model, data, tmp_path / "a", epochs=2, **quiet)
    train(model, data, tmp_path / "b", epochs=1, **quiet)
    resumed = train(model, data, tmp_path / "b", epochs=2, resume=True, **quiet)
    assert resumed.step == straight.step == 12
    for name in [*straight.params, *straight.state]:
        got = {**resumed.params, **resumed.state}[name]
        assert np.array_equal({**straight.params, **straight.state}[name], got), name
    reference = train(model, data, tmp_path / "torch", epochs=2, progress=False, log=lambda m: None)
    for name, want in reference.params.items():  # the same training, up to fp32 rounding
        assert np.max(np.abs(straight.params[name] - want)) <= 1e-3 * np.max(np.abs(want)), name


def test_a_compiled_step_that_disagrees_with_the_reference_is_refused(tmp_path, data, monkeypatch):
    model = tiny()
    wrong = dataclasses.replace(model, regularizers=dataclasses.replace(model.regularizers, weight_decay=0.5))
    build = compiled_train.build_program
    monkeypatch.setattr(compiled_train, "build_program", lambda m, name, batch: build(wrong, name, batch))
    with pytest.raises(FFCompileError, match="--backend onnxruntime: the compiled train_step failed its parity check"):
        train(model, data, tmp_path / "run", epochs=1, progress=False, log=lambda m: None, backend="onnxruntime",
              make_step=compiled_train.compiled_steps(model, "onnxruntime", data, log=lambda m: None))


def test_backend_option(tmp_path):
    help_text = invoke("train", "--help").output
    assert "--backend" in help_text and "fastest available" in help_text
    small = SMALL
    assert "--backend tvm runs on this machine's CPU" in error_line(
        invoke("train", small, "--out", tmp_path / "r", "--backend", "tvm", "--device", "cuda:0"))
    assert compiled_train.default_backend(load_model(small), "cpu") == "tvm"
    assert compiled_train.default_backend(load_model(small), "cuda") == "torch"
