"""Everything a bundle names is a plain file inside it, hashed, and checked before it is opened:
a forged manifest (file and digest rewritten consistently, as anyone without the signing key can)
still cannot make the runtime open, load or run anything outside the bundle."""

import json
import os
import shutil
import subprocess
import sys

import onnx
import pytest

from ffcompile.core.errors import FFCompileError
from ffcompile.runtime.bundle import load_bundle
from ffcompile.contract.manifest import sha256_file
from ffcompile.contract.integrity import write_digest


def forge(root, change):
    """Rewrite the manifest and its digest, as an attacker without the signing key can."""
    manifest = json.loads((root / "manifest.json").read_text())
    change(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))
    write_digest(root)


def refused(root, *needles):
    with pytest.raises(FFCompileError) as e:
        load_bundle(root)
    message = str(e.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "other-hashed-file", "backslash", "dot-segment"])
def test_program_file_outside_the_bundle_refused(bundle_copy, tmp_path, kind):
    outside = tmp_path / "outside.onnx"
    shutil.copyfile(bundle_copy / "programs" / "infer_softmax.onnx", outside)
    name = {"absolute": str(outside), "dotdot": "../outside.onnx", "other-hashed-file": "programs/other.onnx",
            "backslash": "programs\\infer_softmax.onnx", "dot-segment": "programs/./infer_softmax.onnx"}[kind]
    if kind == "other-hashed-file":
        shutil.copyfile(outside, bundle_copy / "programs" / "other.onnx")

        def change(m):
            m["programs"]["infer_softmax"]["file"] = name
            m["files"]["programs/other.onnx"] = sha256_file(outside)
            del m["files"]["programs/infer_softmax.onnx"]
            os.unlink(bundle_copy / "programs" / "infer_softmax.onnx")
    else:
        def change(m):
            m["programs"]["infer_softmax"]["file"] = name
    forge(bundle_copy, change)
    if kind == "other-hashed-file":  # listed and hashed, but it is the file of no program: loads fine
        load_bundle(bundle_copy)
        return
    refused(bundle_copy, "infer_softmax", "plain relative path inside the bundle")


def test_files_entry_outside_the_bundle_refused(bundle_copy, tmp_path):
    outside = tmp_path / "secret"
    outside.write_text("secret")
    forge(bundle_copy, lambda m: m["files"].__setitem__("../secret", sha256_file(outside)))
    refused(bundle_copy, "../secret", "plain relative path inside the bundle")


def test_fifo_in_the_bundle_refused(bundle_copy):
    os.mkfifo(bundle_copy / "programs" / "pipe")
    refused(bundle_copy, "programs/pipe", "is a FIFO")


def test_listed_file_replaced_by_a_symlink_refused(bundle_copy):
    target = bundle_copy.parent / "elsewhere.onnx"
    shutil.move(bundle_copy / "programs" / "infer_softmax.onnx", target)
    os.symlink(target, bundle_copy / "programs" / "infer_softmax.onnx")
    refused(bundle_copy, "symbolic link")


def test_symlinked_program_folder_refused(bundle_copy, tmp_path):
    shutil.move(bundle_copy / "programs", tmp_path / "programs")
    os.symlink(tmp_path / "programs", bundle_copy / "programs")
    refused(bundle_copy, "symbolic link")


def _load_in_subprocess(root, timeout=60):
    code = ("import sys\nfrom ffcompile.core.errors import FFCompileError\nfrom ffcompile.runtime.bundle import load_bundle\n"
            "try:\n    load_bundle(sys.argv[1])\nexcept FFCompileError as e:\n    print('refused:', e)\n")
    return subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, timeout=timeout)


def test_manifest_fifo_refused_without_hanging(bundle_copy):
    (bundle_copy / "manifest.json").unlink()
    os.mkfifo(bundle_copy / "manifest.json")
    result = _load_in_subprocess(bundle_copy)  # a blocking open would wait for a writer forever
    assert "refused:" in result.stdout and "is a FIFO" in result.stdout, result.stdout + result.stderr


def test_manifest_symlink_refused(bundle_copy, tmp_path):
    shutil.move(bundle_copy / "manifest.json", tmp_path / "manifest.json")
    os.symlink(tmp_path / "manifest.json", bundle_copy / "manifest.json")
    refused(bundle_copy, "manifest.json", "symbolic link")


def test_oversized_manifest_refused(bundle_copy):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["padding"] = "x" * (20 << 20)
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    refused(bundle_copy, "manifest.json", "larger than")


def test_onnx_external_data_refused(bundle_copy, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # onnxruntime resolves the external data of a model loaded from bytes here
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\0" * 4096)
    path = bundle_copy / "programs" / "infer_softmax.onnx"
    proto = onnx.load_from_string(path.read_bytes())
    init = next(t for t in proto.graph.initializer if t.raw_data or t.float_data)
    init.ClearField("raw_data")
    init.ClearField("float_data")
    init.data_location = onnx.TensorProto.EXTERNAL
    init.external_data.add(key="location", value=secret.name)
    path.write_bytes(proto.SerializeToString())
    forge(bundle_copy, lambda m: m["files"].__setitem__("programs/infer_softmax.onnx", sha256_file(path)))
    refused(bundle_copy, "infer_softmax", "external data", "self-contained")


def test_outside_tvm_library_never_loaded(bundle_copy, tmp_path):
    """A TVM program outside the bundle: its constructor must not run (dlopen runs it before any
    check could look at the library)."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    marker = tmp_path / "constructor-ran"
    src = tmp_path / "evil.c"
    src.write_text('#include <stdio.h>\n__attribute__((constructor)) static void run(void) {'
                   f' FILE *f = fopen("{marker}", "w"); if (f) fclose(f); }}\n')
    lib = tmp_path / "evil.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    (tmp_path / "evil.so.json").write_text('{"inputs": [], "outputs": [], "function": "main"}')

    def change(m):
        m["target"] = {**m["target"], "backend": "tvm", "tvm": {"kind": "llvm"}}
        for entry in m["programs"].values():
            entry["backend"] = "tvm"
            entry["file"] = str(lib)
    forge(bundle_copy, change)
    with pytest.raises(FFCompileError) as e:
        load_bundle(bundle_copy)
    assert not marker.exists(), "the outside library's constructor ran"


def test_external_data_scan_agrees_with_onnx(tiny_bundle):
    """The runtime's onnx-free scan against the onnx package, on every program of a bundle with
    each initializer in turn moved to external data, and inside a subgraph attribute."""
    from ffcompile.runtime.onnx_scan import uses_external_data

    for path in sorted((tiny_bundle / "programs").glob("*.onnx")):
        proto = onnx.load_from_string(path.read_bytes())
        assert not uses_external_data(proto.SerializeToString())
        for i in range(min(len(proto.graph.initializer), 5)):
            changed = onnx.ModelProto()
            changed.CopyFrom(proto)
            changed.graph.initializer[i].data_location = onnx.TensorProto.EXTERNAL
            assert uses_external_data(changed.SerializeToString()), (path.name, i)
    inner = onnx.helper.make_graph([], "inner", [], [], initializer=[
        onnx.helper.make_tensor("w", onnx.TensorProto.FLOAT, [1], [0.0])])
    inner.initializer[0].external_data.add(key="location", value="x.bin")
    node = onnx.helper.make_node("If", ["c"], ["y"], then_branch=inner, else_branch=inner)
    model = onnx.helper.make_model(onnx.helper.make_graph([node], "g", [], []))
    assert uses_external_data(model.SerializeToString())
