"""Training that diverges stops with one line naming the tensor and the step, keeps the last good
checkpoint, and no message claims a checkpoint that does not exist."""

import dataclasses
import re
import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ffcompile.loop import epochs as loop
from ffcompile.contract.checkpoint import load_checkpoint
from ffcompile.data import load_mnist
from ffcompile.core.errors import FFCompileError
from ffcompile.runtime.bundle import load_bundle
from ffcompile.contract.integrity import write_digest
from ffcompile.contract.manifest import sha256_file
from ffcompile.core.spec import load_model
from ffcompile.reference.train import Dataset, train
from cli_helpers import error_line, invoke  # tests/cli_helpers.py

HUGE_LR = 1e30


def last_error_line(result) -> str:
    """A command that printed progress first, then failed: its last line is the one-line error."""
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("error: "), result.output
    return line


def spec_with_lr(tiny_spec, tmp_path, lr):
    path = tmp_path / "spec.toml"
    path.write_text(tiny_spec.read_text().replace("lr = 0.001", f"lr = {lr}"))
    return path


def test_train_divergence_stops_with_one_line(tiny_spec, tmp_path):
    run = tmp_path / "run"
    line = last_error_line(invoke("train", spec_with_lr(tiny_spec, tmp_path, HUGE_LR), "--out", run, "--epochs", "2",
                             "--limit", "100", "--no-progress", "--backend", "torch"))
    assert re.search(r"diverged at step \d+ \(epoch 1\)", line), line
    assert any(f"{name}" in line for name in ("h1", "h2", "softmax")), line
    assert "no checkpoint was written" in line and not (run / "checkpoint.safetensors").exists()


@pytest.fixture
def lr_blows_up_after_epoch_1(monkeypatch):
    """The learning rate jumps to 1e30 from the second epoch on: a run that diverges after one good epoch."""
    ordinary = loop.learning_rate
    monkeypatch.setattr(loop, "learning_rate", lambda model, epoch, epochs: HUGE_LR if epoch >= 1 else
                        ordinary(model, epoch, epochs))


def test_train_keeps_the_last_good_checkpoint(tiny_spec, tmp_path, lr_blows_up_after_epoch_1):
    x, y = load_mnist("builtin", "train")
    data = Dataset(x[:100], y[:100], None, None, "subset")
    with pytest.raises(FFCompileError) as e:
        train(load_model(tiny_spec), data, tmp_path, epochs=3, progress=False, log=lambda _: None)
    message = str(e.value)
    step = re.search(r"diverged at step (\d+) \(epoch 2\)", message)
    assert "\n" not in message and step and int(step.group(1)) > 5, message  # 5 steps per epoch
    assert "the last good checkpoint (epoch 1) is kept" in message, message
    ckpt = load_checkpoint(tmp_path / "checkpoint.safetensors")
    assert ckpt.epoch == 1 and all(np.isfinite(v).all() for v in [*ckpt.params.values(), *ckpt.state.values()])
    assert [r["epoch"] for r in json.loads((tmp_path / "metrics.json").read_text())["epochs"]] == [1]


def test_finetune_divergence_stops_and_keeps_the_last_good_checkpoint(tiny_bundle, tmp_path, lr_blows_up_after_epoch_1):
    bundle = load_bundle(tiny_bundle)
    x, y = load_mnist("builtin", "train")
    with pytest.raises(FFCompileError) as e:
        bundle.finetune(x[:100], y[:100], 3, tmp_path / "ft", progress=False, log=lambda _: None)
    message = str(e.value)
    assert "\n" not in message and "diverged" in message and "epoch 2" in message, message
    assert "the last good checkpoint (epoch 1) is kept" in message, message
    assert load_checkpoint(tmp_path / "ft" / "checkpoint.safetensors").epoch == 1


def test_finetune_huge_lr_from_the_start_writes_nothing(tiny_bundle, tmp_path):
    bundle = load_bundle(tiny_bundle)
    model = dataclasses.replace(bundle.model, optimizer=dataclasses.replace(bundle.model.optimizer, lr=HUGE_LR))
    bundle = dataclasses.replace(bundle, model=model)
    x, y = load_mnist("builtin", "train")
    with pytest.raises(FFCompileError) as e:
        bundle.finetune(x[:100], y[:100], 2, tmp_path / "ft", progress=False, log=lambda _: None)
    assert "diverged" in str(e.value) and "no checkpoint was written" in str(e.value), str(e.value)
    assert not (tmp_path / "ft" / "checkpoint.safetensors").exists()


def test_bundle_with_nan_weights_refused(tiny_bundle, tmp_path):
    root = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, root)
    weights = load_file(str(root / "weights.safetensors"))
    weights["h2.weight"][3, 4] = np.nan
    from safetensors import safe_open

    with safe_open(str(root / "weights.safetensors"), "np") as f:
        meta = f.metadata()
    save_file(weights, str(root / "weights.safetensors"), metadata=meta)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["files"]["weights.safetensors"] = sha256_file(root / "weights.safetensors")
    (root / "manifest.json").write_text(json.dumps(manifest))
    write_digest(root)
    line = error_line(invoke("run", root))
    assert "h2.weight" in line and "NaN" in line, line


def test_train_zero_epochs_claims_no_checkpoint(tiny_spec, tmp_path):
    result = invoke("train", tiny_spec, "--out", tmp_path / "run", "--epochs", "0", "--limit", "100", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "checkpoint" not in result.output.replace("no checkpoint", ""), result.output
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists()


def test_interrupt_in_the_first_epoch_claims_no_checkpoint(tiny_spec, tmp_path, monkeypatch):
    def interrupted(model, epoch, epochs):
        raise KeyboardInterrupt
    monkeypatch.setattr(loop, "learning_rate", interrupted)
    result = invoke("train", tiny_spec, "--out", tmp_path / "run", "--epochs", "2", "--limit", "100", "--no-progress")
    assert result.exit_code == 130, result.output
    assert "no epoch was completed" in result.output and "is saved" not in result.output, result.output
