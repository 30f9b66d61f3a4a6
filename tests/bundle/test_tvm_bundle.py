"""TVM bundles: x86-cpu-tvm (host) builds with a 100-step trajectory within parity and works with
run / verify / finetune; arm-cpu cross-compiles aarch64 libraries, is checked on a labelled host
proxy at build time, and is refused on x86 with one line. Bad targets and a missing cross
compiler are one-line errors."""

from __future__ import annotations

import json

import pytest

from ffcompile.compiler.build import build_bundle
from ffcompile.runtime.machine import elf_machine, host_arch
from ffcompile.runtime.bundle import load_bundle
from cli_helpers import error_line, invoke  # tests/cli_helpers.py

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # the ONNX importer renames dotted names



@pytest.fixture(scope="module")
def tvm_build_log():
    return []


@pytest.fixture(scope="module")
def tvm_bundle(tiny_spec, tmp_path_factory, tvm_build_log):
    out = tmp_path_factory.mktemp("bundles") / "tiny-x86-tvm"
    manifest = build_bundle(tiny_spec, "x86-cpu-tvm", out, infer_batch=50, verify_steps=100, progress=False,
                            log=tvm_build_log.append)
    return out, manifest


def test_build_says_how_much_working_memory_each_program_plans(tvm_bundle, tvm_build_log):
    out, manifest = tvm_bundle
    for name in manifest["programs"]:
        planned = json.loads((out / f"programs/{name}.so.json").read_text())["planned_working_bytes"]
        assert f"{name}: {planned / 2**20:.1f} MiB of working memory per call" in "\n".join(tvm_build_log)


def test_x86_tvm_bundle_passes_a_100_step_trajectory(tvm_bundle):
    out, manifest = tvm_bundle
    assert manifest["parity_passed"] is True
    for name, entry in manifest["programs"].items():
        assert entry["file"] == f"programs/{name}.so" and entry["backend"] == "tvm"
        assert entry["file"] in manifest["files"] and entry["file"] + ".json" in manifest["files"]
        assert elf_machine(out / entry["file"]) == host_arch()
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"] and "host_proxy" not in report
    assert {f"{p}/{k}" for p in manifest["programs"] for k in ("random", "real")} == set(report["summary"]["programs"])
    traj = report["summary"]["trajectory"]
    assert traj["steps"] == 100 and traj["passed"]
    assert traj["within_strict_tolerance"], traj  # tiny: the strict 1e-4 holds outright


def test_x86_tvm_bundle_runs_verifies_and_finetunes(tvm_bundle, tmp_path):
    out, _ = tvm_bundle
    bundle = load_bundle(out)
    assert type(bundle.programs["train_step"]).__name__ == "TVMProgram"
    result = invoke("run", out, "--json")
    assert result.exit_code == 0, result.output
    assert set(json.loads(result.output)["readouts"]) == {"goodness", "softmax"}
    result = invoke("verify", out, "--steps", "3", "--no-progress")
    assert result.exit_code == 0 and "parity PASSED" in result.output, result.output
    result = invoke("finetune", out, "--epochs", "1", "--limit", "60", "--out", tmp_path / "ft", "--no-progress")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "ft" / "checkpoint.safetensors").is_file()


def test_arm_bundle_is_aarch64_and_refused_here(tiny_arm_bundle):
    manifest = json.loads((tiny_arm_bundle / "manifest.json").read_text())
    assert manifest["target"]["arch"] == "aarch64" and manifest["target"]["tvm"]["mtriple"] == "aarch64-linux-gnu"
    for entry in manifest["programs"].values():
        assert elf_machine(tiny_arm_bundle / entry["file"]) == "aarch64"
    report = json.loads((tiny_arm_bundle / "parity.json").read_text())
    assert report["passed"] and report["host_proxy"]["what"].startswith("HOST PROXY")
    if host_arch() == "x86_64":
        line = error_line(invoke("run", tiny_arm_bundle))
        assert "aarch64" in line and "x86_64" in line and "--emulate" in line


def test_unknown_target_is_one_line(tiny_spec, tmp_path):
    line = error_line(invoke("build", tiny_spec, "--target", "no-such-target", "-o", tmp_path / "b"))
    assert "unknown target 'no-such-target'" in line and "arm-cpu" in line


def test_missing_cross_compiler_names_the_debian_package(tiny_spec, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH
    line = error_line(invoke("build", tiny_spec, "--target", "arm-cpu", "-o", tmp_path / "b", "--no-progress"))
    assert "aarch64-linux-gnu-gcc" in line and "gcc-aarch64-linux-gnu" in line
    assert not (tmp_path / "b").exists()


def test_bad_tvm_target_fields_name_file_and_field(tmp_path, tiny_spec):
    bad = tmp_path / "arm-bad.toml"
    bad.write_text('backend = "tvm"\ndevice = "cpu"\narch = "aarch64"\ncc = "aarch64-linux-gnu-gcc"\n'
                   'tvm = { kind = "llvm", mtriple = "x86_64-linux-gnu" }\n')
    line = error_line(invoke("build", tiny_spec, "--target", bad, "-o", tmp_path / "b"))
    assert str(bad) in line and "tvm.mtriple" in line
    bad.write_text('backend = "tvm"\ndevice = "cpu"\narch = "aarch64"\ntvm = { kind = "llvm", mtriple = "aarch64-linux-gnu" }\n')
    assert "cc:" in error_line(invoke("build", tiny_spec, "--target", bad, "-o", tmp_path / "b"))
    bad.write_text('backend = "onnxruntime"\ndevice = "cpu"\narch = "x86_64"\nproviders = ["CPUExecutionProvider"]\n'
                   'tvm = { kind = "llvm" }\n')
    assert "tvm:" in error_line(invoke("build", tiny_spec, "--target", bad, "-o", tmp_path / "b"))
