"""The reference trainer: bit-identical resume, and real MNIST learning."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from ffcompile.contract.checkpoint import load_checkpoint
from ffcompile.data import load_mnist
from ffcompile.core.spec import DenseLayer, Readout, Training, load_model
from ffcompile.reference.train import Dataset, evaluate_params, train

SMALL = Path(__file__).parents[2] / "models" / "mnist-small.toml"


@pytest.fixture(scope="module")
def subset():
    x, y = load_mnist("builtin", "train")
    xv, yv = load_mnist("builtin", "val")
    return x, y, xv, yv


def tiny():
    model = load_model(SMALL)
    return dataclasses.replace(model, layers=(DenseLayer("h1", 64), DenseLayer("h2", 48)),
                               readout=Readout(goodness_layers=("h1", "h2"), softmax_layers=("h2",)),
                               training=Training(batch_size=50, epochs=3, seed=5))


def test_resume_continues_bit_identically(tmp_path, subset):
    x, y, xv, yv = subset
    data = Dataset(x[:600], y[:600], xv[:200], yv[:200], "subset")
    model = tiny()
    straight = train(model, data, tmp_path / "a", epochs=3, progress=False, log=lambda m: None)
    train(model, data, tmp_path / "b", epochs=1, progress=False, log=lambda m: None)
    resumed = train(model, data, tmp_path / "b", epochs=3, resume=True, progress=False, log=lambda m: None)
    assert resumed.epoch == straight.epoch == 3 and resumed.step == straight.step
    for name in straight.params:
        assert np.array_equal(straight.params[name], resumed.params[name]), name
    for name in straight.state:
        assert np.array_equal(straight.state[name], resumed.state[name]), name
    on_disk = load_checkpoint(tmp_path / "b" / "checkpoint.safetensors")
    assert all(np.array_equal(on_disk.params[k], v) for k, v in straight.params.items())


def test_refuses_to_overwrite_a_run_without_resume(tmp_path, subset):
    x, y, xv, yv = subset
    data = Dataset(x[:100], y[:100], None, None, "subset")
    train(tiny(), data, tmp_path, epochs=1, progress=False, log=lambda m: None)
    from ffcompile.core.errors import FFCompileError

    with pytest.raises(FFCompileError, match="pass --resume"):
        train(tiny(), data, tmp_path, epochs=1, progress=False, log=lambda m: None)


def test_real_mnist_learns_far_above_chance(tmp_path, subset):
    """2 epochs of the 2x500 network on the built-in real-MNIST subset (4167 images): chance is 90 %."""
    x, y, xv, yv = subset
    xt, yt = load_mnist("builtin", "test")
    model = load_model(SMALL)
    ckpt = train(model, Dataset(x, y, None, None, "subset"), tmp_path, epochs=2, progress=False, log=lambda m: None)
    softmax = evaluate_params(model, ckpt.params, xt, yt, "softmax")
    goodness = evaluate_params(model, ckpt.params, xt, yt, "goodness")
    assert softmax < 35.0, softmax
    assert goodness < 60.0, goodness
