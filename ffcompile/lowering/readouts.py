"""Readouts (sec. 3.3): goodness accumulated per label over chosen layers, and the one-pass linear
softmax over normalized activities of chosen layers (trained without backprop into them)."""

from __future__ import annotations

from ..core.builder import Builder
from ..core.program import Value
from ..core.spec import Model
from .layer import normalize, run_layers


def layer_feature(b: Builder, y: Value, model: Model, i: int, tag: str) -> Value:
    """One layer's part of the softmax readout's input: its normalized activities."""
    with b.scope(f"{tag}/{model.layers[i].name}"):
        return normalize(b, y, model)


def readout_features(b: Builder, rows: Value, params: dict[str, Value], model: Model, tag: str) -> Value:
    """The softmax readout's input for ``rows``: a forward pass up to the highest readout layer,
    the readout layers' normalized activities side by side."""
    return side_by_side(b, readout_pass(b, rows, params, model, tag, range(len(model.layers)))[0])


def readout_pass(b: Builder, rows: Value, params: dict[str, Value], model: Model, tag: str,
                 layers: range) -> tuple[list[Value], Value]:
    """The forward pass of ``rows`` through ``layers``, stopping at the highest readout layer:
    (the features of the readout layers among them, the activities of the last layer run)."""
    chosen = {model.layer_index(n) for n in model.readout.softmax_layers}
    features, y = [], rows
    for i, _x, _z, y in run_layers(b, rows, params, model, tag, layers):
        if i in chosen:
            features.append(layer_feature(b, y, model, i, tag))
        if i == max(chosen):
            break
    return features, y


def side_by_side(b: Builder, features: list[Value]) -> Value:
    return features[0] if len(features) == 1 else b.concat(features, axis=1)


def softmax(b: Builder, logits: Value) -> Value:
    shifted = b.sub(logits, b.reduce_max(logits, [1], keepdims=True))
    e = b.exp(shifted)
    return b.div(e, b.reduce_sum(e, [1], keepdims=True))


def softmax_logits(b: Builder, features: Value, params: dict[str, Value]) -> Value:
    return b.add(b.matmul(features, params["softmax.weight"], trans_b=True), params["softmax.bias"])


def softmax_gradient(b: Builder, features: Value, probs: Value, labels: Value, norm: int | None = None):
    """Cross-entropy over the batch: dlogits = (p - onehot) / B. Returns (dW, db, loss). ``norm``:
    B when these rows are one shard of a larger batch (default: the rows).

    The true class's entry p - 1 is computed as minus the other classes' probabilities: near
    p = 1, p - 1 in fp32 is rounding noise, which Adam would turn into steps of size lr."""
    batch, classes = probs.shape
    n = norm or batch
    with b.scope("softmax_rule"):
        onehot = b.one_hot(labels, classes)
        others = b.mul(probs, b.sub(1.0, onehot))
        dlogits = b.mul(b.sub(others, b.mul(onehot, b.reduce_sum(others, [1], keepdims=True))), 1.0 / n)
        picked = b.reduce_sum(b.mul(probs, onehot), [1])
        loss = b.mul(b.reduce_sum(b.log(b.maximum(picked, 1e-30)), [0]), -1.0 / n)
        return b.matmul(dlogits, features, trans_a=True), b.reduce_sum(dlogits, [0]), loss
