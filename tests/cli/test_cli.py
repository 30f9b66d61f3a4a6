"""The command line as a user meets it: one-line errors for bad input, non-zero exit, no traceback."""

import gzip
import json
import shutil
from pathlib import Path

from click.testing import CliRunner

from cli_helpers import assert_user_error  # tests/cli_helpers.py
from ffcompile.cli import main

REPO = Path(__file__).parents[2]


def invoke(*args, env=None):
    result = CliRunner().invoke(main, [str(a) for a in args], env=env, catch_exceptions=False)
    return result


def test_help_explains_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("train", "eval", "data", "inspect"):
        assert command in result.output


def test_malformed_toml(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n[[layers]\n')
    assert_user_error(invoke("train", bad, "--out", tmp_path / "r"), "not valid TOML")


def test_unknown_layer_kind(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n[[layers]]\nkind = "conv"\nsize = 4\n')
    assert_user_error(invoke("train", bad, "--out", tmp_path / "r"), "unknown layer kind 'conv'")


def test_missing_data_dir(tmp_path):
    result = invoke("train", REPO / "models" / "mnist-small.toml", "--out", tmp_path / "r",
                    "--data-dir", tmp_path / "nowhere")
    assert_user_error(result, "nowhere")


def test_corrupt_idx_file(tmp_path):
    data = tmp_path / "mnist"
    shutil.copytree(REPO / "ffcompile" / "data" / "builtin", data)
    (data / "SHA256SUMS").unlink()
    target = data / "t10k-labels-idx1-ubyte.gz"
    target.write_bytes(gzip.compress(gzip.decompress(target.read_bytes())[:-7]))
    (tmp_path / "run").mkdir()
    result = invoke("eval", tmp_path / "run", "--data-dir", data)
    assert result.exit_code != 0 and "Traceback" not in result.output


def test_train_eval_round_trip(tmp_path):
    run = tmp_path / "run"
    spec = tmp_path / "small.toml"
    spec.write_text((REPO / "models" / "mnist-small.toml").read_text().replace("size = 500", "size = 32"))
    result = invoke("train", spec, "--out", run, "--epochs", "1", "--limit", "500", "--no-progress")
    assert result.exit_code == 0, result.output
    for name in ("checkpoint.safetensors", "metrics.json", "curves.png", "receptive_fields.png"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"][0]["epoch"] == 1 and "val_error.goodness" in metrics["epochs"][0]
    result = invoke("eval", run, "--json")
    assert result.exit_code == 0
    report = json.loads(result.output.strip().splitlines()[-1])
    assert set(report["error_percent"]) == {"goodness", "softmax"}
    assert_user_error(invoke("train", spec, "--out", run, "--epochs", "1"), "pass --resume")
