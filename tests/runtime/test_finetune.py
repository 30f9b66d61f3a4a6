"""Fine-tuning with the compiled train_step: checkpoints, resume, and the bundle left untouched."""

import json

import numpy as np
import pytest

from ffcompile.contract.checkpoint import load_checkpoint
from ffcompile.data import load_mnist
from ffcompile.core.errors import FFCompileError
from ffcompile.runtime.bundle import load_bundle
from ffcompile.contract.manifest import checksums


@pytest.fixture(scope="module")
def data():
    x, y = load_mnist(None, "train")
    return x[:100], y[:100]


def quiet(_):
    pass


def test_resume_is_bit_identical(tiny_bundle, tmp_path, data):
    bundle = load_bundle(tiny_bundle)
    straight = bundle.finetune(*data, epochs=2, out_dir=tmp_path / "straight", progress=False, log=quiet)
    bundle.finetune(*data, epochs=1, out_dir=tmp_path / "split", progress=False, log=quiet)
    resumed = bundle.finetune(*data, epochs=2, out_dir=tmp_path / "split", resume=True, progress=False, log=quiet)
    assert (resumed.epoch, resumed.step) == (straight.epoch, straight.step) == (2, 10)
    for name in straight.params:
        np.testing.assert_array_equal(resumed.params[name], straight.params[name])
    for name in straight.state:
        np.testing.assert_array_equal(resumed.state[name], straight.state[name])
    history = json.loads((tmp_path / "split" / "metrics.json").read_text())["epochs"]
    assert [h["epoch"] for h in history] == [1, 2]


def test_checkpoint_and_metrics_each_epoch(tiny_bundle, tmp_path, data):
    bundle = load_bundle(tiny_bundle)
    x_val, y_val = load_mnist(None, "val")
    bundle.finetune(*data, epochs=2, out_dir=tmp_path / "ft", progress=False, val=(x_val, y_val), log=quiet)
    ckpt = load_checkpoint(tmp_path / "ft" / "checkpoint.safetensors")
    assert ckpt.model == bundle.model and ckpt.epoch == 2
    metrics = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert metrics["target"] == "x86-cpu" and len(metrics["epochs"]) == 2
    assert {"val_error.goodness", "val_error.softmax", "loss.h1", "separation.h2"} <= set(metrics["epochs"][-1])
    assert not list((tmp_path / "ft").glob(".*.tmp"))  # atomic writes left no temp files


def test_existing_run_needs_resume(tiny_bundle, tmp_path, data):
    bundle = load_bundle(tiny_bundle)
    bundle.finetune(*data, epochs=1, out_dir=tmp_path / "ft", progress=False, log=quiet)
    with pytest.raises(FFCompileError, match="exists: pass --resume"):
        bundle.finetune(*data, epochs=1, out_dir=tmp_path / "ft", progress=False, log=quiet)


def test_never_writes_into_the_bundle(bundle_copy, data):
    before = checksums(bundle_copy)
    bundle = load_bundle(bundle_copy)
    for out in (bundle_copy, bundle_copy / "programs" / "ft"):
        with pytest.raises(FFCompileError, match="must be outside the bundle"):
            bundle.finetune(*data, epochs=1, out_dir=out, progress=False, log=quiet)
    bad = data[0].copy()
    bad[3, 3] = np.inf
    with pytest.raises(FFCompileError, match="NaN/inf"):
        bundle.finetune(bad, data[1], epochs=1, out_dir=bundle_copy.parent / "ft", progress=False, log=quiet)
    assert checksums(bundle_copy) == before
    load_bundle(bundle_copy)


def test_with_weights_refuses_another_network(tiny_bundle, tmp_path):
    from ffcompile.contract.checkpoint import Checkpoint, save_checkpoint
    from ffcompile.lowering import init_state
    from ffcompile.core.spec import load_model
    from pathlib import Path

    other = load_model(Path(__file__).parents[2] / "models" / "mnist-small.toml")
    params, state = init_state(other, 0)
    save_checkpoint(tmp_path / "other.safetensors", Checkpoint(other, params, state, 1, 1))
    with pytest.raises(FFCompileError, match="does not fit bundle"):
        load_bundle(tiny_bundle).with_weights(tmp_path / "other.safetensors")
