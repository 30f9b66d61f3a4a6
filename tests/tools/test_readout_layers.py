"""tools/readout_layers.py chooses readout layers from the features the compiled readout sees: its
per-layer features, put back together, reproduce ``infer_softmax`` exactly, for a supervised
model (neutral label in the input) and an unsupervised locally connected one."""

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from ffcompile.reference.interpreter import TorchProgram
from ffcompile.lowering import build_program, init_state
from ffcompile.core.spec import LocalLayer, load_model

REPO = Path(__file__).parents[2]
spec = importlib.util.spec_from_file_location("readout_layers", REPO / "bench" / "readout_layers.py")
readout_layers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(readout_layers)


def small(name: str):
    model = load_model(REPO / "models" / f"{name}.toml")
    layers = tuple(dataclasses.replace(layer, channels=2 + i) if isinstance(layer, LocalLayer)
                   else dataclasses.replace(layer, size=16 + i) for i, layer in enumerate(model.layers))
    return dataclasses.replace(model, layers=layers)


@pytest.mark.parametrize("name,chosen", [("mnist-supervised", ("h2", "h3", "h4")), ("mnist-local", ("h2", "h3"))])
def test_layer_features_reproduce_the_softmax_readout(name, chosen):
    model = small(name)
    model = dataclasses.replace(model, readout=dataclasses.replace(model.readout, softmax_layers=chosen))
    rng = np.random.default_rng(0)
    params, _ = init_state(model, seed=1)
    width = sum(model.layers[model.layer_index(n)].size for n in chosen)
    params["softmax.weight"] = rng.normal(size=(10, width)).astype(np.float32)
    params["softmax.bias"] = rng.normal(size=10).astype(np.float32)
    x = rng.random((7, 784), dtype=np.float32)  # fewer rows than the tool's batch: padding is cut off

    features = readout_layers.layer_features(model, params, x)
    assert list(features) == [layer.name for layer in model.layers]
    joined = torch.cat([features[n] for n in chosen], dim=1)
    logits = joined @ torch.as_tensor(params["softmax.weight"]).T + torch.as_tensor(params["softmax.bias"])

    program = TorchProgram(build_program(model, "infer_softmax", len(x)))
    needed = {v.name for v in program.program.inputs}
    probs = program.run_numpy({**{k: v for k, v in params.items() if k in needed}, "x": x})["probs"]
    np.testing.assert_allclose(torch.softmax(logits, 1).numpy(), probs, rtol=1e-5, atol=1e-6)
