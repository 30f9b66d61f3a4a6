"""ffcompile.emulation (and the ELF checks of ffcompile.runtime.machine): ELF detection, host-tool errors, apt source parsing, and (marker
``emulation``) an end-to-end run of onnxruntime and a TVM library under qemu-aarch64.

The end-to-end tests build the sysroot in the default cache directory the first time (about a
minute and ~150 MB of downloads here), then reuse it. Host tools come from .ci/install_emulation.sh;
without them the tests that need them skip, except under CI (CI=true), where they fail.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ffcompile.emulation import qemu as emulation
from ffcompile.emulation.qemu import EmulationError, check_host_tools, cross_compiler, ensure_sysroot
from ffcompile.runtime.machine import elf_machine, host_arch, is_elf_for, require_elf_for
from ffcompile.core.errors import FFCompileError


def _need(program: str, package: str) -> str:
    path = shutil.which(program)
    if path:
        return path
    msg = f"{program} not installed (Debian package {package}; run .ci/install_emulation.sh)"
    if os.environ.get("CI"):
        pytest.fail(msg + " -- CI must install it")
    pytest.skip(msg)


@pytest.fixture
def aarch64_gcc() -> str:
    return _need("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu")


# ---------------------------------------------------------------------------------------------
# ELF headers
# ---------------------------------------------------------------------------------------------

def test_elf_machine_of_cross_compiled_object(tmp_path, aarch64_gcc):
    src = tmp_path / "one.c"
    src.write_text("int ffc_one(void) { return 1; }\n")
    obj = tmp_path / "one.o"
    subprocess.run([aarch64_gcc, "-c", str(src), "-o", str(obj)], check=True)
    assert elf_machine(obj) == "aarch64"
    assert is_elf_for(obj, "aarch64")
    assert is_elf_for(obj, "arm64")  # Debian's name for it
    assert not is_elf_for(obj, "x86_64")
    if host_arch() == "x86_64":
        with pytest.raises(FFCompileError, match=r"built for aarch64, this needs x86_64.*emulate"):
            require_elf_for(obj)
    require_elf_for(obj, "aarch64")


def test_elf_machine_of_host_python():
    exe = Path(os.path.realpath(sys.executable))
    assert elf_machine(exe) == host_arch()
    assert is_elf_for(exe, host_arch())
    require_elf_for(exe)


@pytest.mark.parametrize("e_machine,name,big_endian", [
    (183, "aarch64", False), (62, "x86_64", False), (40, "armv7l", False), (243, "riscv64", False),
    (40, "armv7l", True), (8, "mips", True), (4242, "unknown(4242)", False),
])
def test_elf_machine_from_header_bytes(tmp_path, e_machine, name, big_endian):
    order = "big" if big_endian else "little"
    head = b"\x7fELF" + bytes([2, 2 if big_endian else 1, 1]) + bytes(9)
    head += (3).to_bytes(2, order) + e_machine.to_bytes(2, order) + bytes(44)
    f = tmp_path / "x.so"
    f.write_bytes(head)
    assert elf_machine(f) == name


def test_not_elf(tmp_path):
    f = tmp_path / "model.onnx"
    f.write_bytes(b"\x08\x07not an elf file")
    assert not is_elf_for(f, "aarch64")
    with pytest.raises(FFCompileError, match="not an ELF file"):
        elf_machine(f)
    with pytest.raises(FFCompileError, match="cannot read"):
        is_elf_for(tmp_path / "missing.so", "aarch64")
    with pytest.raises(FFCompileError, match="unknown architecture"):
        is_elf_for(f, "sparc")


# ---------------------------------------------------------------------------------------------
# Host tools
# ---------------------------------------------------------------------------------------------

def test_check_host_tools_names_the_debian_package(tmp_path, monkeypatch):
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(EmulationError) as err:
        check_host_tools("aarch64")
    msg = str(err.value)
    assert "qemu-aarch64 not found" in msg
    assert "apt-get install qemu-user" in msg
    assert "\n" not in msg
    assert isinstance(err.value, FFCompileError)
    with pytest.raises(EmulationError, match=r"aarch64-linux-gnu-gcc not found.*gcc-aarch64-linux-gnu"):
        cross_compiler("aarch64")


def test_check_host_tools_reports_the_cross_compiler(tmp_path, monkeypatch):
    fake = tmp_path / "bin"
    fake.mkdir()
    qemu = fake / "qemu-aarch64"
    qemu.write_text("#!/bin/sh\n")
    qemu.chmod(0o755)
    monkeypatch.setenv("PATH", str(fake))
    with pytest.raises(EmulationError, match=r"apt-get install gcc-aarch64-linux-gnu"):
        check_host_tools()


def test_host_tools_present(aarch64_gcc):
    _need("qemu-aarch64", "qemu-user")
    check_host_tools("aarch64")
    assert cross_compiler() == aarch64_gcc


def test_only_aarch64_is_emulated():
    with pytest.raises(EmulationError, match="only set up for aarch64"):
        check_host_tools("riscv")


# ---------------------------------------------------------------------------------------------
# apt sources and the sysroot's pins (no network)
# ---------------------------------------------------------------------------------------------

def test_host_apt_sources_reads_both_formats(tmp_path):
    etc = tmp_path / "apt"
    (etc / "sources.list.d").mkdir(parents=True)
    (etc / "sources.list").write_text(
        "# a comment\n"
        "deb [arch=amd64,arm64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
        "http://mirror.example/debian bookworm main contrib\n"
        "deb-src http://mirror.example/debian bookworm main\n"
    )
    (etc / "sources.list.d" / "debian.sources").write_text(
        "Types: deb deb-src\n"
        "URIs: http://deb.example/debian\n"
        "Suites: bookworm bookworm-updates\n"
        "Components: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        "\n"
        "# disabled\n"
        "Types: deb\n"
        "URIs: http://deb.example/debian-security\n"
        "Suites: bookworm-security\n"
        "Components: main\n"
        "Enabled: no\n"
        "\n"
        "Types: deb\n"
        "URIs: https://deb.thirdparty.example/node_20.x\n"
        "Suites: nodistro\n"
        "Components: main\n"
        "Architectures: amd64\n"
    )
    (etc / "sources.list.d" / "old.list.disabled").write_text("deb http://x/debian sid main\n")
    got = emulation.host_apt_sources(etc)
    assert [(s.uri, s.suites) for s in got] == [
        ("http://mirror.example/debian", ["bookworm"]),
        ("http://deb.example/debian", ["bookworm", "bookworm-updates"]),
        ("https://deb.thirdparty.example/node_20.x", ["nodistro"]),
    ]
    assert got[0].architectures == ["amd64", "arm64"]
    assert got[0].components == ["main", "contrib"]
    assert [s.is_debian for s in got] == [True, True, False]
    kept = emulation._sources_for(emulation._arch("aarch64"), etc)
    assert [s.uri for s in kept] == ["http://mirror.example/debian", "http://deb.example/debian"]


def test_no_debian_mirror_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("FFCOMPILE_APT_SOURCES", raising=False)
    (tmp_path / "sources.list").write_text("deb http://archive.ubuntu.com/ubuntu jammy main\n")
    with pytest.raises(EmulationError, match="no Debian mirror.*FFCOMPILE_APT_SOURCES"):
        emulation._sources_for(emulation._arch("aarch64"), tmp_path)


def test_wheels_are_pinned_to_host_versions():
    import importlib.metadata as md
    pins = dict(emulation._wanted_wheels(emulation.DEVICE_WHEELS))
    assert pins["numpy"] == md.version("numpy")
    assert pins["onnxruntime"] == md.version("onnxruntime")
    assert pins["apache-tvm-ffi"] == "0.1.14.post1"
    assert dict(emulation._wanted_wheels(["numpy==1.0"])) == {"numpy": "1.0"}


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("FFCOMPILE_CACHE", str(tmp_path))
    assert emulation.default_cache_dir() == tmp_path / "sysroot-aarch64"
    monkeypatch.delenv("FFCOMPILE_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert emulation.default_cache_dir() == Path.home() / ".cache/ffcompile/sysroot-aarch64"


def test_guest_env_appends_pythonpath(tmp_path, monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libfoo.so")
    monkeypatch.setenv("PYTHONPATH", "/host/only")
    s = emulation.Sysroot(root=tmp_path / "root", site=tmp_path / "site",
                          python=tmp_path / "root/usr/bin/python3.11")
    env = s.guest_env({"PYTHONPATH": "/a:/b", "FOO": "1"})
    assert env["PYTHONPATH"] == f"{tmp_path / 'site'}:/a:/b"
    assert env["TVM_USE_RUNTIME_LIB"] == "1"
    assert env["FOO"] == "1"
    assert "LD_PRELOAD" not in env


# ---------------------------------------------------------------------------------------------
# End to end under qemu (marker: emulation)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sysroot():
    _need("qemu-aarch64", "qemu-user")
    _need("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu")
    return ensure_sysroot("aarch64")  # default cache: built once per machine


def _relax_module():
    from tvm.script import ir as I
    from tvm.script import relax as R

    @I.ir_module
    class Module:
        @R.function
        def main(x: R.Tensor((2, 3), "float32"),
                 y: R.Tensor((2, 3), "float32")) -> R.Tensor((2, 3), "float32"):
            with R.dataflow():
                z = R.nn.relu(R.add(R.multiply(x, y), x))
                R.output(z)
            return z

    return Module


DEVICE_SCRIPT = r"""
import json, platform, sys
import numpy as np
import onnxruntime as ort
import tvm
from tvm.runtime.vm import VirtualMachine

model, lib_path, inputs = sys.argv[1:4]
x, y = np.load(inputs + "/x.npy"), np.load(inputs + "/y.npy")

sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
(ort_out,) = sess.run(None, {"a": x, "b": y})

lib = tvm.runtime.load_module(lib_path)
vm = VirtualMachine(lib, tvm.cpu())
tvm_out = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(y)).numpy()

print(json.dumps({"machine": platform.machine(), "numpy": np.__version__,
                  "onnxruntime": ort.__version__, "tvm": tvm.__version__,
                  "ort": ort_out.tolist(), "tvm_out": tvm_out.tolist()}))
"""


@pytest.mark.emulation
def test_onnxruntime_and_tvm_on_emulated_aarch64(sysroot, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    import tvm

    # ONNX Add model, made on the host.
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 3])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [2, 3])
    c = helper.make_tensor_value_info("c", TensorProto.FLOAT, [2, 3])
    graph = helper.make_graph([helper.make_node("Add", ["a", "b"], ["c"])], "add", [a, b], [c])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, tmp_path / "add.onnx")

    # TVM library cross-compiled on the host for aarch64.
    target = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})
    lib = tmp_path / "fn.so"
    tvm.compile(_relax_module(), target=target).export_library(str(lib), cc=cross_compiler())
    assert is_elf_for(lib, "aarch64")
    if host_arch() != "aarch64":
        with pytest.raises(FFCompileError, match="built for aarch64"):
            require_elf_for(lib)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3), dtype=np.float32)
    y = rng.standard_normal((2, 3), dtype=np.float32)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    np.save(inputs / "x.npy", x)
    np.save(inputs / "y.npy", y)
    script = tmp_path / "device.py"
    script.write_text(DEVICE_SCRIPT)

    proc = sysroot.run_python(script, [str(tmp_path / "add.onnx"), str(lib), str(inputs)],
                              timeout=600)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["machine"] == "aarch64"
    import importlib.metadata as md
    assert out["onnxruntime"] == md.version("onnxruntime")
    assert out["numpy"] == md.version("numpy")
    np.testing.assert_array_equal(np.asarray(out["ort"], dtype=np.float32), x + y)
    np.testing.assert_allclose(np.asarray(out["tvm_out"], dtype=np.float32),
                               np.maximum(x * y + x, 0), rtol=1e-6, atol=1e-6)


def test_a_host_command_past_its_timeout_is_killed_with_one_line():
    with pytest.raises(EmulationError, match=r"^sleep timed out after 0.5 s$"):
        emulation._run_host(["sleep", "30"], "sleep", timeout=0.5)


@pytest.mark.emulation
def test_run_python_failure_carries_stderr(sysroot, tmp_path):
    script = tmp_path / "fail.py"
    script.write_text("import sys\nprint('to stdout')\nsys.stderr.write('device says boom\\n')\n"
                      "sys.exit(3)\n")
    with pytest.raises(EmulationError, match=r"exited with status 3: device says boom") as err:
        sysroot.run_python(script)
    assert err.value.returncode == 3
    assert "to stdout" in err.value.stdout
    assert "\n" not in str(err.value)
    with pytest.raises(EmulationError, match="python script not found"):
        sysroot.run_python(tmp_path / "missing.py")


@pytest.mark.emulation
def test_run_python_env_and_cached_sysroot(sysroot, tmp_path):
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "ffc_probe.py").write_text("VALUE = 42\n")
    script = tmp_path / "probe.py"
    script.write_text("import json, os, sys, ffc_probe\n"
                      "print(json.dumps({'v': ffc_probe.VALUE, 'tvm': os.environ['TVM_USE_RUNTIME_LIB'],"
                      " 'argv': sys.argv[1:], 'x': os.environ.get('FFC_X')}))\n")
    proc = sysroot.run_python(script, ["p", "q"], env={"PYTHONPATH": str(extra), "FFC_X": "y"},
                              timeout=300)
    assert json.loads(proc.stdout) == {"v": 42, "tvm": "1", "argv": ["p", "q"], "x": "y"}
    # A second call returns the cached sysroot without building anything.
    again = ensure_sysroot("aarch64", progress=False)
    assert again.root == sysroot.root and again.python.exists()
