"""The recurrent top-down model (sec. 3.4) through the user-facing chain: train -> eval -> build
(with parity) -> run -> finetune, on models/mnist-recurrent.toml shrunk to 2 x 32 units."""

import json

from cli_helpers import assert_user_error, invoke, succeeded  # tests/cli_helpers.py

SPEC = """
name = "recurrent-tiny"

[input]
size = 784
label = { kind = "top_layer", classes = 10 }

[[layers]]
name = "h1"
size = 32

[[layers]]
name = "h2"
size = 32

[normalization]
kind = "rms"

[goodness]
kind = "ssq"
threshold_per_unit = 1.0

[regularizers]
weight_decay = 1e-3

[optimizer]
kind = "adam"
lr = 0.001

[schedule]
kind = "linear_cooldown"
cooldown_start = 0.5

[negatives]
kind = "hard_label"

[readout]
goodness_layers = ["h1", "h2"]

[recurrent]
iterations = 4
damping = 0.3
readout_iterations = [2, 3]

[training]
batch_size = 20
epochs = 1
seed = 0
"""


def test_recurrent_train_eval_build_run_finetune(tmp_path):
    spec = tmp_path / "recurrent-tiny.toml"
    spec.write_text(SPEC)
    run, bundle = tmp_path / "run", tmp_path / "bundle"

    succeeded(invoke("train", spec, "--out", run, "--epochs", 1, "--limit", 200, "--no-progress"))
    for name in ("checkpoint.safetensors", "metrics.json", "curves.png", "receptive_fields.png"):
        assert (run / name).is_file(), name
    epoch = json.loads((run / "metrics.json").read_text())["epochs"][0]
    assert 0 <= epoch["val_error.goodness"] <= 100  # the goodness readout is validated every epoch

    evaluated = json.loads(succeeded(invoke("eval", run, "--json")).output)
    assert list(evaluated["error_percent"]) == ["goodness"]
    reference_error = evaluated["error_percent"]["goodness"]
    assert 0 <= reference_error <= 100
    assert_user_error(invoke("eval", run, "--readout", "softmax"), "has no softmax readout")

    succeeded(invoke("build", run, "--target", "x86-cpu", "-o", bundle, "--verify-steps", 10, "--no-progress"))
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert set(manifest["programs"]) == {"train_step", "infer_goodness"}
    assert manifest["parity_passed"] is True
    parity = json.loads((bundle / "parity.json").read_text())
    assert parity["passed"] is True

    ran = json.loads(succeeded(invoke("run", bundle, "--json")).output)
    assert list(ran["readouts"]) == ["goodness"]
    # the same weights on the same test split: the compiled readout agrees with the reference
    assert abs(ran["readouts"]["goodness"]["error_percent"] - reference_error) <= 0.2

    tuned = tmp_path / "tuned"
    succeeded(invoke("finetune", bundle, "--epochs", 1, "--limit", 200, "--out", tuned, "--no-progress"))
    assert (tuned / "checkpoint.safetensors").is_file()
    record = json.loads((tuned / "metrics.json").read_text())["epochs"][0]
    assert 0 <= record["val_error.goodness"] <= 100
    succeeded(invoke("run", bundle, "--weights", tuned / "checkpoint.safetensors", "--json"))
