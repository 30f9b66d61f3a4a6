"""x86-cpu-tvm-native: TVM compiled for the build host's own CPU, beside the portable x86-64-v3 target."""

import json
import platform

import pytest

from ffcompile.compiler.build import build_bundle
from ffcompile.compiler.targets import find_target

pytestmark = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="an x86-64 host target")


def test_native_target_names_the_host_cpu_and_its_isa():
    from tvm.target import codegen

    native, portable = find_target("x86-cpu-tvm-native"), find_target("x86-cpu-tvm")
    assert native.tvm["mcpu"] == codegen.llvm_get_system_cpu() != "native"
    assert portable.tvm["mcpu"] == "x86-64-v3"
    assert f"[built for {native.tvm['mcpu']}: " in native.description


def test_native_bundle_builds_and_passes_parity(tmp_path, tiny_spec):
    out = tmp_path / "native"
    build_bundle(tiny_spec, "x86-cpu-tvm-native", out, infer_batch=50, verify_steps=5, progress=False, log=lambda _: None)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parity_passed"] is True
    target = manifest["target"]
    assert target["name"] == "x86-cpu-tvm-native" and target["tvm"]["mcpu"] not in ("native", "x86-64-v3")
    assert any(isa in target["description"] for isa in ("AVX-512", "AVX2+FMA", "SSE4.2", "baseline"))
