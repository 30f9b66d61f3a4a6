"""The bundle commands end to end, through click, and their one-line errors."""

import json

import numpy as np

from ffcompile.contract.manifest import checksums
from cli_helpers import error_line, invoke  # tests/cli_helpers.py



def test_build_run_verify_finetune(tiny_spec, tmp_path):
    bundle = tmp_path / "tiny-x86"
    result = invoke("build", tiny_spec, "--target", "x86-cpu", "-o", bundle, "--verify-steps", "3", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "parity PASSED" in result.output and "wrote bundle" in result.output

    result = invoke("run", bundle, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert set(out["readouts"]) == {"goodness", "softmax"} and out["examples"] == 1000
    assert out["readouts"]["softmax"]["median_batch_ms"] > 0 and out["readouts"]["softmax"]["examples_per_second"] > 0

    result = invoke("verify", bundle, "--steps", "3", "--report", tmp_path / "parity.json", "--no-progress")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "parity.json").read_text())
    assert report["passed"] and report["trajectory"]["steps"] == 3

    result = invoke("finetune", bundle, "--epochs", "1", "--limit", "60", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "test error" in result.output and "val error" in result.output
    ckpt = tmp_path / "tiny-x86.finetune" / "checkpoint.safetensors"
    assert ckpt.is_file()

    result = invoke("run", bundle, "--weights", ckpt, "--readout", "softmax")
    assert result.exit_code == 0 and "ms per batch" in result.output, result.output


def test_run_bad_inputs_fail_cleanly_and_leave_the_bundle_alone(tiny_bundle, tmp_path):
    before = checksums(tiny_bundle)
    cases = {
        "shape.npy": (np.zeros((4, 100), np.float32), "expected shape [N, 784]"),
        "text.npy": (np.array([["a"] * 784]), "cannot be used as float32 pixels"),
        "nan.npy": (np.where(np.eye(4, 784) > 0, np.nan, 0).astype(np.float32), "NaN/inf"),
    }
    for name, (array, message) in cases.items():
        np.save(tmp_path / name, array)
        line = error_line(invoke("run", tiny_bundle, "--input", tmp_path / name))
        assert message in line
    np.save(tmp_path / "pickled.npy", np.array([{"a": 1}], dtype=object))
    assert "without pickles" in error_line(invoke("run", tiny_bundle, "--input", tmp_path / "pickled.npy"))
    assert checksums(tiny_bundle) == before


def test_predictions_from_npy(tiny_bundle, tmp_path):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((7, 784)).astype(np.float64))
    result = invoke("run", tiny_bundle, "--input", tmp_path / "x.npy", "--json", "--readout", "softmax")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.output)["readouts"]["softmax"]["predictions"]) == 7


def test_cuda_bundle_run_says_no_gpu(tiny_spec, tmp_path):
    import onnxruntime

    result = invoke("build", tiny_spec, "--target", "cuda", "-o", tmp_path / "cuda", "--verify-steps", "0", "--no-progress")
    assert result.exit_code == 0, result.output
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        assert "parity check skipped" in result.output
        assert "no GPU / CUDA execution provider here" in error_line(invoke("run", tmp_path / "cuda"))


def test_errors_are_one_line(tiny_bundle, tmp_path):
    assert "unknown target 'pdp11'" in error_line(invoke("build", "models/mnist-small.toml", "--target", "pdp11",
                                                         "-o", tmp_path / "b"))
    assert "not a bundle" in error_line(invoke("run", tmp_path))
    assert "must be outside the bundle" in error_line(invoke("finetune", tiny_bundle, "--epochs", "1",
                                                             "--out", tiny_bundle / "ft"))
    assert "is not a next-character model" in error_line(invoke("generate", tiny_bundle, "--prompt", "a" * 20))


def test_verify_fails_on_a_miscompiled_program(tiny_spec, bundle_copy, tmp_path):
    """A train_step with the same signature but another learning rule (weight decay 1e-2 instead
    of 1e-3), slipped in with a forged checksum: verify must exit 1."""
    from ffcompile.compiler.build import build_bundle
    from ffcompile.contract.integrity import write_digest
    from ffcompile.contract.manifest import sha256_file

    spec = tmp_path / "decay.toml"
    spec.write_text(tiny_spec.read_text().replace("weight_decay = 1e-3", "weight_decay = 1e-2"))
    build_bundle(spec, "x86-cpu", tmp_path / "other", verify_steps=0, progress=False, log=lambda _: None)
    rel = "programs/train_step.onnx"
    (bundle_copy / rel).write_bytes((tmp_path / "other" / rel).read_bytes())
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["files"][rel] = sha256_file(bundle_copy / rel)
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    write_digest(bundle_copy)  # a consistently forged bundle: verify still catches the wrong program
    result = invoke("verify", bundle_copy, "--steps", "2", "--no-progress")
    assert result.exit_code == 1, result.output
    assert "parity FAILED" in result.output and "train_step/real" in result.output
