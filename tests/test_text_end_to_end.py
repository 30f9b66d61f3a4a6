"""The next-character model (sec. 4.1) through the user-facing chain on the built-in Aesop corpus:
train (sleep-phase regime) -> resume -> eval -> build (parity of all four programs) -> run ->
finetune on the device runtime, on models/text-nextchar.toml shrunk to 3 x 16 units."""

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from ffcompile.data.text import ALPHABET

from cli_helpers import assert_user_error, invoke, succeeded  # tests/cli_helpers.py


def tiny_spec(tmp_path):
    spec = tmp_path / "text-tiny.toml"
    source = (Path(__file__).parents[1] / "models" / "text-nextchar.toml").read_text()
    spec.write_text(source.replace("size = 2000", "size = 16").replace("batch_size = 22320", "batch_size = 540")
                    .replace('phases = "together"', 'phases = "separate"'))
    return spec


def test_text_train_resume_eval_build_run_finetune(tmp_path, monkeypatch):
    monkeypatch.delenv("FFCOMPILE_TEXT_CORPUS", raising=False)
    spec = tiny_spec(tmp_path)
    run, once, bundle = tmp_path / "run", tmp_path / "once", tmp_path / "bundle"

    assert_user_error(invoke("train", spec, "--out", run, "--limit", 100), "use a multiple of 90")
    succeeded(invoke("train", spec, "--out", run, "--epochs", 2, "--limit", 2160, "--no-progress"))
    history = json.loads((run / "metrics.json").read_text())["epochs"]
    assert [e["epoch"] for e in history] == [1, 2]
    for e in history:  # both halves ran: positive goodness from one, negative from the other
        assert {"goodness_pos.h1", "goodness_neg.h1", "train_perplexity", "val_perplexity"} <= set(e)
        assert 1 < e["val_perplexity"] < 30  # better than uniform over 30 symbols
    # interrupted after one epoch and resumed: the same weights, bit for bit
    succeeded(invoke("train", spec, "--out", once, "--epochs", 1, "--limit", 2160, "--no-progress"))
    succeeded(invoke("train", spec, "--out", once, "--epochs", 2, "--limit", 2160, "--resume", "--no-progress"))
    a, b = load_file(run / "checkpoint.safetensors"), load_file(once / "checkpoint.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)

    evaluated = json.loads(succeeded(invoke("eval", run, "--json", "--split", "val")).output)
    assert abs(evaluated["perplexity"] - history[-1]["val_perplexity"]) < 1e-3
    assert list(evaluated["error_percent"]) == ["softmax"]

    succeeded(invoke("build", run, "--target", "x86-cpu", "-o", bundle, "--verify-steps", 10, "--no-progress"))
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert set(manifest["programs"]) == {"train_step", "train_positive", "train_negative", "infer_softmax"}
    assert manifest["parity_passed"] is True

    ran = json.loads(succeeded(invoke("run", bundle, "--json", "--split", "val")).output)
    assert abs(ran["perplexity"] - evaluated["perplexity"]) < 1e-3  # compiled == reference on the same weights
    assert abs(ran["readouts"]["softmax"]["error_percent"] - evaluated["error_percent"]["softmax"]) <= 0.2

    # continuing a prompt with the bundle alone: reproducible per seed, in the alphabet
    prompt = "The Wolf and the Lamb. Once upon a time"
    text = succeeded(invoke("generate", bundle, "--prompt", prompt, "--length", 40, "--seed", 3)).output.rstrip("\n")
    assert len(text) == 40 and set(text) <= set(ALPHABET)
    assert succeeded(invoke("generate", bundle, "--prompt", prompt, "--length", 40, "--seed", 3)).output.rstrip("\n") == text
    assert_user_error(invoke("generate", bundle, "--prompt", "The Wolf"), "needs at least 10 characters")

    tuned = tmp_path / "tuned"
    assert_user_error(invoke("finetune", bundle, "--epochs", 1, "--limit", 91, "--out", tuned), "multiple of 90")
    succeeded(invoke("finetune", bundle, "--epochs", 1, "--limit", 2160, "--out", tuned, "--no-progress"))
    record = json.loads((tuned / "metrics.json").read_text())["epochs"][0]
    assert 1 < record["val_perplexity"] < 30 and "goodness_neg.h1" in record
    succeeded(invoke("run", bundle, "--weights", tuned / "checkpoint.safetensors", "--json"))
