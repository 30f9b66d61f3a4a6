"""A CIFAR-10 recurrent net of local layers (sec. 4) through the user-facing chain on generated
records in the official binary format: train -> eval (both readouts) -> build for x86-cpu with
parity (programs and a training trajectory) -> run. The model is table 1's recipe at toy size:
32x32x3 images, two 8x8 maps of 2 units per location (4x4 fields at stride 4 over the image,
3x3 fields with padding 1 between the maps), 3 iterations."""

import json

import numpy as np
import pytest
import torch

from cli_helpers import error_line, invoke, succeeded  # tests/cli_helpers.py
from ffcompile.data.cifar import PIXELS, SUBDIR, TEST_FILE, TRAIN_FILES

SPEC = """
name = "cifar-tiny"

[input]
dataset = "cifar10"
size = 3072
image_shape = [32, 32]
channels = 3
label = { kind = "top_layer", classes = 10 }

[[layers]]
name = "h1"
kind = "local"
grid = 8
field = 4
stride = 4
channels = 2

[[layers]]
name = "h2"
kind = "local"
grid = 8
field = 3
stride = 1
padding = 1
channels = 2

[goodness]
kind = "neg_ssq"

[regularizers]
weight_decay = 1e-3

[optimizer]
kind = "adam"
lr = 0.001

[negatives]
kind = "hard_label"

[readout]
goodness_layers = ["h1", "h2"]
softmax_layers = ["h2"]

[recurrent]
iterations = 3
damping = 0.3
readout_iterations = [2, 3]

[training]
batch_size = 10
epochs = 1
"""


def write_cifar(root, per_file=20, seed=0):
    """Records in the binary layout: a label byte, then the R, G and B planes (each 32x32)."""
    rng = np.random.default_rng(seed)
    folder = root / SUBDIR
    folder.mkdir(parents=True)
    for name in TRAIN_FILES + (TEST_FILE,):
        labels = rng.integers(0, 10, per_file, dtype=np.uint8)
        pixels = rng.integers(0, 256, (per_file, PIXELS), dtype=np.uint8)
        (folder / name).write_bytes(np.concatenate([labels[:, None], pixels], axis=1).tobytes())
    return root


@pytest.fixture
def one_torch_thread():
    """The reference runs thousands of tiny matmuls; on a busy 2-core machine a second thread
    made each ~25x slower (see ffcompile.reference.parity)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_cifar_train_eval_build_run(tmp_path, one_torch_thread):
    data = write_cifar(tmp_path / "cifar")
    spec = tmp_path / "cifar-tiny.toml"
    spec.write_text(SPEC)
    run, bundle = tmp_path / "run", tmp_path / "bundle"

    out = succeeded(invoke("train", spec, "--data-dir", data, "--out", run, "--no-progress")).output
    assert "training on 90 examples" in out and "validating on 10" in out
    for name in ("checkpoint.safetensors", "metrics.json", "curves.png", "receptive_fields.png"):
        assert (run / name).is_file(), name
    epoch = json.loads((run / "metrics.json").read_text())["epochs"][0]
    assert {"val_error.goodness", "val_error.softmax", "loss.softmax", "loss.h1", "loss.h2"} <= set(epoch)

    evaluated = json.loads(succeeded(invoke("eval", run, "--data-dir", data, "--batch", 10, "--json")).output)
    assert set(evaluated["error_percent"]) == {"goodness", "softmax"}

    succeeded(invoke("build", run, "--data-dir", data, "--target", "x86-cpu", "-o", bundle, "--infer-batch", 10,
               "--verify-steps", 5, "--no-progress"))
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert set(manifest["programs"]) == {"train_step", "infer_goodness", "infer_softmax"}
    report = json.loads((bundle / "parity.json").read_text())
    assert manifest["parity_passed"] is True and report["passed"] is True
    assert report["summary"]["trajectory"]["steps"] == 5 and report["summary"]["trajectory"]["within_strict_tolerance"]

    ran = json.loads(succeeded(invoke("run", bundle, "--data-dir", data, "--json")).output)
    for readout in ("goodness", "softmax"):  # the same weights on the same test split as eval
        assert abs(ran["readouts"][readout]["error_percent"] - evaluated["error_percent"][readout]) <= 5.0


def test_missing_cifar_files_are_one_line(tmp_path):
    spec = tmp_path / "cifar-tiny.toml"
    spec.write_text(SPEC)
    (tmp_path / "empty").mkdir()
    line = error_line(invoke("train", spec, "--data-dir", tmp_path / "empty", "--out", tmp_path / "run"))
    assert "CIFAR-10 binary files missing" in line and "data_batch_1.bin" in line
