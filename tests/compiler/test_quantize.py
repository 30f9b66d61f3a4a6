"""Reduced-precision inference programs: int8 programs compute what the fake-quantized reference
computes, a bundle over its accuracy budget is refused, and `run` never mixes int8 programs with
weights they were not quantized from."""

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from ffcompile.cli import main
from ffcompile.compiler.export import export_onnx
from ffcompile.compiler.quantize import quantize
from ffcompile.contract.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from ffcompile.core.spec import load_model
from ffcompile.data.datasets import load_model_split
from ffcompile.lowering import build_program, init_state
from ffcompile.reference.fake_quant import fake_quantized, quantization_params
from ffcompile.reference.interpreter import TorchProgram
from ffcompile.runtime.ort import OrtProgram

CORNER = 783  # the bottom-right pixel: 0 in every MNIST image


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def trained_tiny(tiny_spec, tmp_path_factory):
    """tests/bundle/tiny.toml after 2 epochs on the built-in subset."""
    run = tmp_path_factory.mktemp("quant") / "run"
    result = invoke("train", tiny_spec, "--out", run, "--backend", "torch", "--no-progress")
    assert result.exit_code == 0, result.output
    return run


@pytest.mark.parametrize("readout", ["goodness", "softmax"])
def test_int8_program_computes_the_fake_quantized_reference(tiny_spec, readout):
    model = load_model(tiny_spec)
    params, _ = init_state(model, 0)
    rng = np.random.default_rng(1)  # weights away from their initial values (the softmax readout starts at 0)
    params = {k: v + rng.normal(0, 0.05, v.shape).astype(np.float32) for k, v in params.items()}
    _, x, _ = load_model_split(model, None, "train")
    proto = quantize(export_onnx(model, params, readout, "test"), "int8", x[:200])
    assert {n.op_type for n in proto.graph.node} >= {"QuantizeLinear", "DequantizeLinear"}
    qparams = quantization_params(proto)
    assert {"h1.weight", "h2.weight"} <= set(qparams) and qparams["h1.weight"]["axis"] == 0

    name = {"goodness": "infer_goodness", "softmax": "infer_softmax"}[readout]
    program = build_program(model, name, 100)
    feeds = {"x": x[300:400], **{k: v for k, v in params.items() if k in {v.name for v in program.inputs}}}
    out = {"goodness": "scores", "softmax": "probs"}[readout]
    got = OrtProgram(proto.SerializeToString()).run({"x": x[300:400]})[out]
    fake = fake_quantized(program, qparams).run_numpy(feeds)[out]
    exact = TorchProgram(program).run_numpy(feeds)[out]
    scale = np.abs(exact).max()
    # The integer kernels agree with the float evaluation of the same rounding far more closely
    # than with the unrounded program: the reference models what int8 does.
    to_fake, to_exact = np.abs(got - fake).max() / scale, np.abs(got - exact).max() / scale
    assert to_fake < 2e-2 and to_fake < to_exact / 5, (to_fake, to_exact)


def test_int8_goodness_program_keeps_each_weight_integer_inside_its_product(tiny_spec):
    """infer_goodness multiplies the first layer's label columns on their own (the labelled
    copies share the image's product): the export stores those columns as an initializer of
    their own and leaves their small product in float32, so every int8 weight is read by its one
    product only. A dequantized weight that a Slice also read would be made in float32 on every
    call (onnxruntime then cannot fuse it into the integer product: 2x the time at batch 1)."""
    model = load_model(tiny_spec)
    params, _ = init_state(model, 0)
    _, x, _ = load_model_split(model, None, "train")
    proto = quantize(export_onnx(model, params, "goodness", "test"), "int8", x[:200])
    readers = {}
    for node in proto.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    weights = {n.output[0] for n in proto.graph.node
               if n.op_type == "DequantizeLinear" and n.input[0].endswith(".weight_quantized")}
    assert weights and all(len(readers[w]) == 1 and readers[w][0].op_type in ("Gemm", "MatMul") for w in weights)
    assert not [n for n in proto.graph.node if n.op_type == "Slice" and n.input[0].endswith(".weight")]


def test_int8_bundle_runs_int8_by_default_and_float32_on_request(trained_tiny, tmp_path):
    bundle = tmp_path / "int8"
    result = invoke("build", trained_tiny, "--target", "x86-cpu", "-o", bundle, "--dtype", "int8",
                    "--verify-steps", "5", "--no-progress", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.splitlines()[-1])["dtype"] == "int8"
    manifest = json.loads((bundle / "manifest.json").read_text())
    section = manifest["reduced_precision"]
    assert section["dtype"] == "int8" and set(section["programs"]) == {"infer_goodness", "infer_softmax"}
    parity = json.loads((bundle / "parity.json").read_text())["reduced_precision"]
    assert parity["passed"] and parity["within_budget"] and not parity["forced"]

    runs = {}
    for dtype in (None, "float32"):
        args = ["run", bundle, "--split", "val", "--json"] + (["--dtype", dtype] if dtype else [])
        result = invoke(*args)
        assert result.exit_code == 0, result.output
        runs[dtype] = json.loads(result.output)
    assert runs[None]["dtype"] == "int8" and runs["float32"]["dtype"] == "float32"
    for readout in ("goodness", "softmax"):
        drop = runs[None]["readouts"][readout]["error_percent"] - runs["float32"]["readouts"][readout]["error_percent"]
        assert abs(drop) <= 2.0, (readout, drop)

    # Fine-tuned weights are not what the int8 programs hold: refused in int8, fine in float32.
    tuned = tmp_path / "tuned"
    result = invoke("finetune", bundle, "--epochs", "1", "--out", tuned, "--no-progress")
    assert result.exit_code == 0, result.output
    stale = invoke("run", bundle, "--weights", tuned)
    assert stale.exit_code != 0 and "--dtype float32" in stale.output and "Traceback" not in stale.output
    assert invoke("run", bundle, "--weights", tuned, "--dtype", "float32").exit_code == 0


def test_bundle_over_its_accuracy_budget_is_refused_unless_forced(trained_tiny, tmp_path):
    # A weight of 1000 on a pixel that is 0 in every image leaves the float32 network unchanged
    # but sets its channel's int8 scale so high that the channel's other weights round to 0.
    ckpt = load_checkpoint(trained_tiny / "checkpoint.safetensors")
    weight = ckpt.params["h1.weight"].copy()
    weight[:, CORNER] = 1000.0
    outlier = tmp_path / "outlier.safetensors"
    save_checkpoint(outlier, Checkpoint(**{**ckpt.__dict__, "params": {**ckpt.params, "h1.weight": weight}}))
    refused = invoke("build", outlier, "--target", "x86-cpu", "-o", tmp_path / "b", "--dtype", "int8",
                     "--verify-steps", "0", "--no-progress")
    assert refused.exit_code != 0 and "over the budget of 0.5 points" in refused.output, refused.output
    assert "Traceback" not in refused.output and not (tmp_path / "b").exists()
    forced = invoke("build", outlier, "--target", "x86-cpu", "-o", tmp_path / "b", "--dtype", "int8",
                    "--verify-steps", "0", "--no-progress", "--force")
    assert forced.exit_code == 0, forced.output
    assert json.loads((tmp_path / "b" / "parity.json").read_text())["reduced_precision"]["forced"] is True


@pytest.mark.parametrize("target, dtype", [("x86-cpu-tvm", "int8"), ("x86-cpu", "float16"), ("x86-cpu", "int4")])
def test_dtype_a_target_cannot_build_is_one_line(tiny_spec, tmp_path, target, dtype):
    result = invoke("build", tiny_spec, "--target", target, "-o", tmp_path / "b", "--dtype", dtype)
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert dtype in result.output.strip().splitlines()[-1], result.output


def test_int8_export_stores_its_weights_in_int8(trained_tiny, tmp_path):
    sizes = {}
    for dtype in ("float32", "int8"):
        out = tmp_path / f"{dtype}.onnx"
        result = invoke("export", trained_tiny, "-o", out, "--dtype", dtype, "--json")
        assert result.exit_code == 0, result.output
        assert [i.name for i in onnx.load(out).graph.input] == ["x"]
        sizes[dtype] = out.stat().st_size
    stored = {t.name: t.data_type for t in onnx.load(tmp_path / "int8.onnx").graph.initializer}
    assert stored["h1.weight_quantized"] == stored["h2.weight_quantized"] == onnx.TensorProto.INT8
    assert "h1.weight" not in stored
    assert sizes["int8"] < 0.5 * sizes["float32"], sizes  # (per-channel scales and the graph weigh more in so small a net)
