"""Names, shapes and initial values of everything a train step carries from one step to the next.

Parameters: ``{layer}.weight`` [out, in] (local layers: [out, receptive field] or masked [out,
in], see ``local``), ``{layer}.bias`` [out], recurrent nets' ``{layer}.top_down.weight`` [out, size
above] (a local layer under a local layer: shaped like a local weight), and the softmax readout's
``softmax.weight`` / ``softmax.bias``. Optimizer state: ``{param}.velocity`` (SGD) or
``{param}.m`` / ``{param}.v`` (Adam). Peer normalization: ``{layer}.peer_mean``.
Initial values come from numpy with an explicit seed so no backend's RNG is involved.
"""

from __future__ import annotations

import numpy as np

from ..core.builder import Builder
from ..core.program import Value
from ..core.spec import LocalLayer, Model
from . import local


def softmax_features(model: Model) -> int:
    return sum(model.layers[model.layer_index(n)].size for n in model.readout.softmax_layers)


def param_specs(model: Model) -> dict[str, tuple[int, ...]]:
    specs = {}
    for i, layer in enumerate(model.layers):
        local_layer = isinstance(layer, LocalLayer)
        specs[f"{layer.name}.weight"] = local.weight_shape(model, i) if local_layer else (layer.size, model.fan_in(i))
        specs[f"{layer.name}.bias"] = (layer.size,)
        if model.recurrent is not None:  # sec. 3.4: input from the layer above (the label layer on top)
            if local.has_local_top_down(model, i):
                specs[f"{layer.name}.top_down.weight"] = local.shape(local.top_down_geometry(model, i))
            else:
                above = model.layers[i + 1].size if i + 1 < len(model.layers) else model.input.label.classes
                specs[f"{layer.name}.top_down.weight"] = (layer.size, above)
    if model.readout.softmax_layers:
        classes = model.input.label.classes
        specs["softmax.weight"] = (classes, softmax_features(model))
        specs["softmax.bias"] = (classes,)
    return specs


def state_specs(model: Model) -> dict[str, tuple[int, ...]]:
    specs = {}
    slots = ("velocity",) if model.optimizer.kind == "sgd" else ("m", "v")
    for name, shape in param_specs(model).items():
        for slot in slots:
            specs[f"{name}.{slot}"] = shape
    if model.regularizers.peer_norm is not None:
        for layer in model.layers:
            specs[f"{layer.name}.peer_mean"] = (layer.size,)
    return specs


def param_inputs(b: Builder, model: Model, only: set[str] | None = None) -> dict[str, Value]:
    """Every parameter (or those named in ``only``) as a program input."""
    return {name: b.input(name, shape) for name, shape in param_specs(model).items() if only is None or name in only}


def state_inputs(b: Builder, model: Model, only: set[str] | None = None) -> dict[str, Value]:
    """Every optimizer-state (and peer-mean) tensor (or those named in ``only``) as a program input."""
    return {name: b.input(name, shape) for name, shape in state_specs(model).items() if only is None or name in only}


def init_state(model: Model, seed: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Dense weights as ``model.initialization`` says (local layers: uniform over their window),
    biases and the softmax readout 0, optimizer state 0, peer means at
    ``peer_norm.initial_mean``."""
    rng = np.random.default_rng(seed)
    params = {}
    local_layers = {f"{layer.name}.weight": local.geometry(model, i)
                    for i, layer in enumerate(model.layers) if isinstance(layer, LocalLayer)}
    local_layers.update({f"{layer.name}.top_down.weight": local.top_down_geometry(model, i)
                         for i, layer in enumerate(model.layers) if local.has_local_top_down(model, i)})
    for name, shape in param_specs(model).items():
        if name in local_layers:
            params[name] = local.init(local_layers[name], rng)
        elif name.endswith(".weight") and not name.startswith("softmax."):
            params[name] = _dense_init(model, shape, rng)
        else:
            params[name] = np.zeros(shape, np.float32)
    state = {name: np.zeros(shape, np.float32) for name, shape in state_specs(model).items()}
    peer = model.regularizers.peer_norm
    for layer in model.layers if peer is not None else ():
        state[f"{layer.name}.peer_mean"][:] = peer.initial_mean
    return params, state


def _dense_init(model: Model, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    scale = 1.0 / np.sqrt(shape[1])
    if model.initialization.kind == "normal":
        return (rng.standard_normal(size=shape) * scale).astype(np.float32)
    return rng.uniform(-scale, scale, size=shape).astype(np.float32)
