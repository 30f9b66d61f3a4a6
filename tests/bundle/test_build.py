import json
import shutil

import numpy as np
import pytest
from safetensors import safe_open

from ffcompile.compiler import build as bundle_module
from ffcompile.compiler.build import build_bundle
from ffcompile.contract.checkpoint import Checkpoint, save_checkpoint
from ffcompile.core.errors import FFCompileError
from ffcompile.lowering import init_state
from ffcompile.contract.manifest import sha256_file
from ffcompile.core.spec import load_model


def quiet(_):
    pass


def test_layout_and_manifest(tiny_bundle, tiny_spec):
    files = sorted(p.relative_to(tiny_bundle).as_posix() for p in tiny_bundle.rglob("*") if p.is_file())
    assert files == ["bundle.digest", "manifest.json", "optimizer.safetensors", "parity.json", "programs/infer_goodness.onnx",
                     "programs/infer_softmax.onnx", "programs/train_step.onnx", "weights.safetensors"]
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    assert (manifest["format"], manifest["format_version"]) == ("ffcompile-bundle", 2)
    assert manifest["model"] == load_model(tiny_spec).to_json()
    assert manifest["target"]["name"] == "x86-cpu" and manifest["target"]["arch"] == "x86_64"
    assert manifest["batch"] == {"train": 20, "infer": 50}
    assert set(manifest["versions"]) >= {"ffcompile", "onnx", "onnxruntime", "numpy"}
    assert manifest["files"] == {rel: sha256_file(tiny_bundle / rel) for rel in files
                                 if rel not in ("manifest.json", "bundle.digest")}
    step = manifest["programs"]["train_step"]
    assert step["file"] == "programs/train_step.onnx" and step["backend"] == "onnxruntime"
    x = next(v for v in step["inputs"] if v["name"] == "x")
    assert x == {"name": "x", "shape": [20, 784], "dtype": "float32"}
    with safe_open(str(tiny_bundle / "optimizer.safetensors"), "np") as f:
        assert (f.metadata()["epoch"], f.metadata()["step"]) == ("0", "0")
    params, _ = init_state(load_model(tiny_spec), 0)
    with safe_open(str(tiny_bundle / "weights.safetensors"), "np") as f:
        np.testing.assert_array_equal(f.get_tensor("h1.weight"), params["h1.weight"])
    assert json.loads((tiny_bundle / "parity.json").read_text())["passed"] is True
    assert not [p for p in tiny_bundle.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_from_run_dir_keeps_weights_and_position(tiny_spec, tmp_path):
    model = load_model(tiny_spec)
    params, state = init_state(model, 5)
    state = {k: v + 0.5 for k, v in state.items()}
    save_checkpoint(tmp_path / "run" / "checkpoint.safetensors", Checkpoint(model, params, state, 3, 120))
    build_bundle(tmp_path / "run", "x86-cpu", tmp_path / "b", verify_steps=0, progress=False, log=quiet)
    with safe_open(str(tmp_path / "b" / "optimizer.safetensors"), "np") as f:
        assert (f.metadata()["epoch"], f.metadata()["step"]) == ("3", "120")
        np.testing.assert_array_equal(f.get_tensor("h1.weight.v"), state["h1.weight.v"])
    assert "checkpoint" in json.loads((tmp_path / "b" / "manifest.json").read_text())["source"]


def test_batch_override_and_missing_readout(tmp_path, tiny_spec):
    text = tiny_spec.read_text().replace('softmax_layers = ["h2"]', "softmax_layers = []") \
        .replace('kind = "hard_label"', 'kind = "random_label"')
    spec = tmp_path / "nosoftmax.toml"
    spec.write_text(text)
    manifest = build_bundle(spec, "x86-cpu", tmp_path / "b", batch=10, verify_steps=0, progress=False, log=quiet)
    assert set(manifest["programs"]) == {"train_step", "infer_goodness"}
    assert manifest["batch"]["train"] == 10 and manifest["model"]["training"]["batch_size"] == 10


def test_refuses_to_overwrite_a_non_bundle(tmp_path, tiny_spec):
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("x")
    with pytest.raises(FFCompileError, match="not a bundle; refusing to overwrite"):
        build_bundle(tiny_spec, "x86-cpu", tmp_path / "precious", verify_steps=0, progress=False, log=quiet)
    assert (tmp_path / "precious" / "thesis.tex").read_text() == "x"


def test_rebuild_replaces_a_bundle(tmp_path, tiny_bundle, tiny_spec):
    out = tmp_path / "b"
    shutil.copytree(tiny_bundle, out)
    (out / "parity.json").write_text("stale")
    build_bundle(tiny_spec, "x86-cpu", out, verify_steps=0, progress=False, log=quiet)
    assert json.loads((out / "parity.json").read_text())["passed"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_interrupted_build_leaves_nothing(tmp_path, tiny_spec, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bundle_module, "_parity", broken)
    with pytest.raises(KeyboardInterrupt):
        build_bundle(tiny_spec, "x86-cpu", tmp_path / "b", verify_steps=0, progress=False, log=quiet)
    assert list(tmp_path.iterdir()) == []


def test_cuda_target_builds_here_with_parity_deferred(tmp_path, tiny_spec):
    manifest = build_bundle(tiny_spec, "cuda", tmp_path / "b", verify_steps=0, progress=False, log=quiet)
    parity = json.loads((tmp_path / "b" / "parity.json").read_text())
    if parity["passed"] is None:  # no CUDA provider on this machine
        assert "CUDAExecutionProvider" in parity["skipped"]
    assert manifest["target"]["providers"] == ["CUDAExecutionProvider"]
