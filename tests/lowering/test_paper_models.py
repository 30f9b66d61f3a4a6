"""The paper's other MNIST experiments compile: every program of small versions of the new models
(unsupervised, locally connected, jittered, min-ssq) runs in onnxruntime from the ONNX emitter and
matches the torch reference in fp32."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from ffcompile.compiler.onnx_emit import to_onnx
from ffcompile.reference.interpreter import TorchProgram
from ffcompile.lowering import build_program, init_state
from ffcompile.runtime.ort import OrtProgram
from ffcompile.core.spec import DenseLayer, LocalLayer, load_model
from outputs import assert_outputs_match  # tests/outputs.py (tests/ is on sys.path via its conftest)

MODELS = Path(__file__).parents[2] / "models"
BATCH = 8


def small(name: str):
    """Same recipe and geometry, few units: local layers keep their grids and fields."""
    model = load_model(MODELS / f"{name}.toml")
    layers = tuple(dataclasses.replace(layer, channels=3 + i) if isinstance(layer, LocalLayer)
                   else dataclasses.replace(layer, size=24) for i, layer in enumerate(model.layers))
    return dataclasses.replace(model, layers=layers)


def programs_of(model):
    names = ["train_step", "infer_softmax"]
    if model.readout.goodness_layers:
        names.append("infer_goodness")
    if model.negatives.kind == "hybrid_image":
        names.append("hybrid_negatives")
    return names


def feeds_for(model, rng):
    params, state = init_state(model, seed=0)
    params = {k: (v + rng.normal(0, 0.05, v.shape)).astype(np.float32) for k, v in params.items()}
    state = {k: np.abs(rng.normal(0, 0.05, v.shape)).astype(np.float32) for k, v in state.items()}
    x = rng.random((BATCH, 784), dtype=np.float32)
    return {**params, **state, "x": x, "x_other": rng.random((BATCH, 784), dtype=np.float32),
            "mask_bits": rng.integers(0, 2, (BATCH, 784)).astype(np.float32),
            "y": rng.integers(0, 10, BATCH).astype(np.int64), "u": rng.random(BATCH, dtype=np.float32),
            "lr": np.float32(1e-3), "step": np.float32(3)}


CASES = [(name, program) for name in ("mnist-unsupervised", "mnist-local", "mnist-jitter", "mnist-minssq", "mnist-ffcode")
         for program in programs_of(small(name))]


@pytest.mark.parametrize("name,program_name", CASES, ids=[f"{n}-{p}" for n, p in CASES])
def test_onnx_program_matches_torch_reference(name, program_name):
    model = small(name)
    program = build_program(model, program_name, BATCH)
    all_feeds = feeds_for(model, np.random.default_rng(1))
    feeds = {v.name: all_feeds[v.name] for v in program.inputs}
    want = TorchProgram(program).run_numpy(feeds)
    got = OrtProgram(to_onnx(program).SerializeToString(), name=program_name).run(feeds)
    assert_outputs_match(got, want, atol=1e-5, rtol=1e-5)


def test_small_versions_keep_the_paper_shapes():
    local = small("mnist-local")
    assert [(layer.grid, layer.stride, layer.field) for layer in local.layers] == [(4, 6, 10), (3, 1, 2), (2, 1, 2)]
    assert all(isinstance(layer, DenseLayer) for layer in small("mnist-unsupervised").layers)
    assert small("mnist-jitter").training.jitter == 2
    assert small("mnist-minssq").goodness.kind == "neg_ssq"
