"""`ffcompile verify --emulate`: an aarch64 bundle runs inference on real images and a 10-step
fine-tuning trajectory under qemu-aarch64 with only the torch-free runtime, and its outputs pass
the parity rules against the torch reference (marker ``emulation``: the cached sysroot is built on
first use, ~1 min; CI installs the host tools with .ci/install_emulation.sh). Missing host tools
and non-aarch64 bundles are one-line errors."""

from __future__ import annotations

import json
import shutil

import pytest

from ffcompile.compiler.build import build_bundle
from cli_helpers import error_line, invoke  # tests/cli_helpers.py
from tests.conftest import TINY_SPEC  # the one tiny spec every bundle test builds


@pytest.fixture(scope="module")
def arm_ort_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "tiny-arm-ort"
    build_bundle(TINY_SPEC, "arm-cpu-ort", out, infer_batch=50, verify_steps=0, progress=False, log=lambda _: None)
    return out


def _need_host_tools():
    for program, package in (("qemu-aarch64", "qemu-user"), ("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu")):
        if shutil.which(program) is None:
            pytest.skip(f"{program} not installed (Debian package {package}; run .ci/install_emulation.sh)")


@pytest.mark.emulation
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_arm_tvm_bundle_on_emulated_device(tiny_arm_bundle, tmp_path):
    _need_host_tools()
    report_path = tmp_path / "emulated.json"
    result = invoke("verify", tiny_arm_bundle, "--emulate", "--report", report_path, "--no-progress")
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert report["passed"] and report["target"] == "arm-cpu" and report["backend"] == "tvm"
    assert {"infer_goodness/real", "infer_softmax/real", "train_step/real"} <= set(report["summary"]["programs"])
    assert report["summary"]["trajectory"]["steps"] == 10 and report["summary"]["trajectory"]["passed"]
    assert report["emulated"]["device"].startswith("aarch64 (cortex-a72) under qemu-aarch64")
    assert len(report["emulated"]["train_step_ms"]) == 10
    assert "emulated aarch64: 10 training steps: " in result.output and "\r" not in result.output  # phase lines


@pytest.mark.emulation
def test_arm_ort_bundle_on_emulated_device(arm_ort_bundle):
    _need_host_tools()
    result = invoke("verify", arm_ort_bundle, "--emulate", "--steps", "3", "--json", "--no-progress")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.splitlines()[-1])
    assert report["passed"] and report["backend"] == "onnxruntime" and report["trajectory"]["steps"] == 3


@pytest.mark.emulation
def test_int8_arm_bundle_on_emulated_device_with_its_cost(tmp_path):
    _need_host_tools()
    bundle = tmp_path / "tiny-arm-int8"
    build_bundle(TINY_SPEC, "arm-cpu-ort", bundle, infer_batch=50, verify_steps=0, progress=False, log=lambda _: None,
                 dtype="int8", force=True)  # (untrained weights: the budget is not what this test is about)
    result = invoke("verify", bundle, "--emulate", "--steps", "1", "--json", "--no-progress")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.splitlines()[-1])
    reduced = report["reduced_precision"]
    assert report["passed"] and reduced["ran_on"] == "the emulated device"
    assert set(reduced["programs"]) == {"infer_goodness", "infer_softmax"}
    assert all(c["passed"] and c["rows"] == 500 for c in reduced["programs"].values())
    cost = report["emulated"]["cost"]
    assert 0 < cost["bundle_bytes"]["inference_int8"] < cost["bundle_bytes"]["inference_float32"]
    assert 100 < cost["peak_rss_mib"]["after_load"] <= cost["peak_rss_mib"]["after_finetuning"]
    counts = {(c["program"], c["rows"]): c["instructions_per_call"] for c in cost["instructions"]}
    assert set(counts) == {("infer_goodness", 50), ("infer_softmax", 50), ("infer_goodness.int8", 50),
                           ("infer_goodness.int8", 1), ("infer_softmax.int8", 50), ("infer_softmax.int8", 1),
                           ("train_step", 20)}
    # repeatable work: one row costs less than a batch, and goodness (10 label rows per image,
    # every layer) more than the softmax readout (one neutral pass)
    assert counts[("infer_goodness.int8", 1)] < counts[("infer_goodness.int8", 50)]
    assert counts[("infer_softmax.int8", 50)] < counts[("infer_goodness.int8", 50)]


def test_missing_qemu_names_the_debian_package(arm_ort_bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    line = error_line(invoke("verify", arm_ort_bundle, "--emulate", "--no-progress"))
    assert "qemu-aarch64" in line and "qemu-user" in line


def test_missing_cross_compiler_names_the_debian_package(arm_ort_bundle, tmp_path, monkeypatch):
    qemu = shutil.which("qemu-aarch64")
    if qemu is None:
        pytest.skip("qemu-aarch64 not installed")
    (tmp_path / "qemu-aarch64").symlink_to(qemu)
    monkeypatch.setenv("PATH", str(tmp_path))
    line = error_line(invoke("verify", arm_ort_bundle, "--emulate", "--no-progress"))
    assert "aarch64-linux-gnu-gcc" in line and "gcc-aarch64-linux-gnu" in line


def test_emulate_refuses_a_host_bundle(tmp_path):
    out = tmp_path / "tiny-x86"
    build_bundle(TINY_SPEC, "x86-cpu", out, infer_batch=50, verify_steps=0, progress=False, log=lambda _: None)
    line = error_line(invoke("verify", out, "--emulate"))
    assert "aarch64" in line and "x86-cpu" in line


def test_the_device_checks_progress_lines_become_phases_with_their_seconds():
    from ffcompile.emulation.verify import _DevicePhases
    from ffcompile.runtime.device_check import PROGRESS

    lines = []
    with _DevicePhases("aarch64", False, lines.append) as phases:
        for line in ("some warning", f"{PROGRESS} phase 2 2 program checks", f"{PROGRESS} advance",
                     f"{PROGRESS} advance", f"{PROGRESS} phase 3 3 training steps", f"{PROGRESS} advance"):
            phases(line)
    assert [line.rsplit(": ", 1)[0] for line in lines] == [
        "emulated aarch64: start Python, load the runtime and the bundle", "emulated aarch64: 2 program checks",
        "emulated aarch64: 3 training steps"]
