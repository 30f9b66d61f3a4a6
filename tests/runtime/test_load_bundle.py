"""Loading refuses anything but the bundle that was built, and bad input never reaches a program."""

import json

import numpy as np
import pytest

from ffcompile.core.errors import FFCompileError
from ffcompile.data import load_mnist
from ffcompile.runtime.bundle import load_bundle
from ffcompile.contract.integrity import write_digest
from ffcompile.contract.manifest import sha256_file


def rewrite_manifest(root, change):
    """Change the manifest and rewrite its digest: a consistent forgery, to reach the later checks."""
    manifest = json.loads((root / "manifest.json").read_text())
    change(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))
    write_digest(root)


def rehash(root, rel):
    rewrite_manifest(root, lambda m: m["files"].__setitem__(rel, sha256_file(root / rel)))


def one_line(excinfo):
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_loads_and_predicts(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    x, y = load_mnist(None, "test")
    assert bundle.readouts == ["goodness", "softmax"]
    predictions = bundle.predict(x[:123])
    assert predictions.shape == (123,) and predictions.dtype == np.int64
    ev = bundle.evaluate(x, y, "softmax")
    assert ev.examples == len(x) and 0 <= ev.error_percent <= 100 and ev.median_batch_ms > 0
    assert ev.error_percent == pytest.approx(np.mean(bundle.predict(x, "softmax") != y) * 100)
    assert (bundle.epoch, bundle.step) == (0, 0)


def test_modified_weight_byte_refused(bundle_copy):
    path = bundle_copy / "weights.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(FFCompileError) as e:
        load_bundle(bundle_copy)
    assert "weights.safetensors does not match its sha256" in one_line(e)


def test_unknown_file_refused(bundle_copy):
    (bundle_copy / "programs" / "backdoor.onnx").write_bytes(b"x")
    with pytest.raises(FFCompileError) as e:
        load_bundle(bundle_copy)
    assert "unexpected file(s) not in the manifest: programs/backdoor.onnx" in one_line(e)


def test_missing_file_refused(bundle_copy):
    (bundle_copy / "programs" / "infer_softmax.onnx").unlink()
    with pytest.raises(FFCompileError) as e:
        load_bundle(bundle_copy)
    assert "missing file(s) listed in the manifest: programs/infer_softmax.onnx" in one_line(e)


def test_truncated_onnx_refused_by_checksum_and_by_the_onnx_reader(bundle_copy):
    path = bundle_copy / "programs" / "train_step.onnx"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(FFCompileError) as e:
        load_bundle(bundle_copy)
    assert "programs/train_step.onnx does not match its sha256" in one_line(e)
    rehash(bundle_copy, "programs/train_step.onnx")  # a forged manifest: the ONNX reader still refuses it
    with pytest.raises(FFCompileError) as e:
        load_bundle(bundle_copy)
    assert "not a readable ONNX model" in one_line(e)


@pytest.mark.parametrize("change,message", [
    (lambda m: m.__setitem__("format_version", 99), "bundle format version 99 is not supported"),
    (lambda m: m.__setitem__("format", "zip"), "not an ffcompile bundle manifest"),
    (lambda m: m.pop("programs"), "manifest lacks programs"),
])
def test_bad_manifest_refused(bundle_copy, change, message):
    rewrite_manifest(bundle_copy, change)
    with pytest.raises(FFCompileError) as e:
        load_bundle(bundle_copy)
    assert message in one_line(e)


def test_not_json_manifest(bundle_copy):
    (bundle_copy / "manifest.json").write_text("{")
    write_digest(bundle_copy)
    with pytest.raises(FFCompileError, match="not valid JSON"):
        load_bundle(bundle_copy)


def test_other_architecture_refused(bundle_copy):
    rewrite_manifest(bundle_copy, lambda m: m["target"].update(name="arm-cpu", arch="aarch64"))
    with pytest.raises(FFCompileError) as e:
        load_bundle(bundle_copy)
    assert "built for target 'arm-cpu' (aarch64, cpu), but this machine is x86_64" in one_line(e)


def test_cuda_bundle_without_cuda_says_so(tiny_spec, tmp_path):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine has the CUDA execution provider")
    from ffcompile.compiler.build import build_bundle

    build_bundle(tiny_spec, "cuda", tmp_path / "b", verify_steps=0, progress=False, log=lambda _: None)
    with pytest.raises(FFCompileError) as e:
        load_bundle(tmp_path / "b")
    assert "no GPU / CUDA execution provider here" in one_line(e)


@pytest.mark.parametrize("x,message", [
    (np.zeros((5, 783), np.float32), r"expected shape \[N, 784\]"),
    (np.zeros((5, 28, 28), np.float32), r"expected shape \[N, 784\]"),
    (np.full((5, 784), "a"), "cannot be used as float32 pixels"),
    (np.zeros((0, 784)), "no rows"),
])
def test_bad_input_one_line_error(tiny_bundle, x, message):
    bundle = load_bundle(tiny_bundle)
    with pytest.raises(FFCompileError, match=message) as e:
        bundle.predict(x)
    one_line(e)


def test_nan_and_bad_labels(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    x = np.zeros((30, 784), np.float32)
    x[7, 3] = np.nan
    with pytest.raises(FFCompileError, match=r"1 NaN/inf value\(s\) \(first in row 7\)"):
        bundle.predict(x)
    with pytest.raises(FFCompileError, match=r"labels must be in 0..9"):
        bundle.evaluate(np.zeros((3, 784)), np.array([1, 2, 10]))
    with pytest.raises(FFCompileError, match=r"labels must be integers"):
        bundle.evaluate(np.zeros((3, 784)), np.array([1.0, 2.0, 3.0]))


@pytest.mark.parametrize("providers", [[1], [["CPUExecutionProvider"]], [], "CPUExecutionProvider"])
def test_malformed_target_providers_refused(bundle_copy, providers):
    """Found by tests/fuzzing.py: a non-string provider crashed the "runs here?" check."""
    rewrite_manifest(bundle_copy, lambda m: m["target"].__setitem__("providers", providers))
    with pytest.raises(FFCompileError) as e:
        load_bundle(bundle_copy)
    assert "target.providers" in one_line(e)


@pytest.mark.parametrize("change", [
    lambda m: m["batch"].__setitem__("train", 7),
    lambda m: m["batch"].__setitem__("infer", 7),
    lambda m: m["model"]["training"].__setitem__("batch_size", 7),
])
def test_batch_sizes_that_disagree_refused(bundle_copy, change):
    rewrite_manifest(bundle_copy, change)
    with pytest.raises(FFCompileError) as e:
        load_bundle(bundle_copy)
    assert "batch" in one_line(e)
