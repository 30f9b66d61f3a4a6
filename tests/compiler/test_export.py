"""`ffcompile export`: one self-contained ONNX file per readout that a plain onnxruntime client
runs at any batch, with the predictions `ffcompile run` makes and the reference's scores."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from ffcompile.cli import main
from ffcompile.compiler.export import export_onnx
from ffcompile.core.spec import load_model
from ffcompile.lowering import build_program, init_state
from ffcompile.reference.interpreter import TorchProgram

# A client that knows nothing of ffcompile: the file and the arrays are all it gets.
CLIENT = """
import sys, numpy as np, onnxruntime as ort
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
for path in sys.argv[2:]:
    np.save(path + ".out.npy", session.run(["prediction"], {"x": np.load(path)})[0])
assert not any(name.startswith("ffcompile") for name in sys.modules)
"""


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("readout", ["goodness", "softmax"])
def test_plain_onnxruntime_predicts_like_ffcompile_run_at_any_batch(tiny_bundle, tmp_path, readout):
    out = tmp_path / "model.onnx"
    result = invoke("export", tiny_bundle, "-o", out, "--readout", readout, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["readout"] == readout
    rng = np.random.default_rng(0)
    inputs = []
    for batch in (1, 7, 100):
        path = tmp_path / f"x{batch}.npy"
        np.save(path, rng.random((batch, 784), dtype=np.float32))
        inputs.append(path)
    subprocess.run([sys.executable, "-I", "-c", CLIENT, str(out), *map(str, inputs)], check=True)
    for path in inputs:
        run = invoke("run", tiny_bundle, "--input", path, "--readout", readout, "--json")
        assert run.exit_code == 0, run.output
        want = json.loads(run.output)["readouts"][readout]["predictions"]
        assert np.load(f"{path}.out.npy").tolist() == want


def test_export_matches_the_reference_and_says_how_to_feed_it(tiny_spec):
    model = load_model(tiny_spec)
    params, _ = init_state(model, 0)
    params = {k: v + np.random.default_rng(1).normal(0, 0.05, v.shape).astype(np.float32) for k, v in params.items()}
    proto = export_onnx(model, params, "goodness", "abc")
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["ffcompile.input_range"] == "[0, 1]" and meta["ffcompile.source_sha256"] == "abc"
    assert json.loads(meta["ffcompile.label_embedding"])["kind"] == "first_pixels"
    assert json.loads(meta["ffcompile.model_ir"])["name"] == "tiny"
    assert [i.name for i in proto.graph.input] == ["x"] and proto.opset_import[0].version >= 18
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    onnx.checker.check_model(proto, full_check=True)

    import onnxruntime as ort

    x = np.random.default_rng(2).random((7, 784), dtype=np.float32)
    got = ort.InferenceSession(proto.SerializeToString()).run(["scores"], {"x": x})[0]
    want = TorchProgram(build_program(model, "infer_goodness", 7)).run_numpy({"x": x, **params})["scores"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_export_refuses_what_it_cannot_write(tmp_path):
    assert "neither a bundle" in invoke("export", tmp_path, "-o", tmp_path / "m.onnx").output
    result = invoke("export", tmp_path / "nope.safetensors", "-o", tmp_path / "m.onnx")
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
