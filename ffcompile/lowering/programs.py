"""The programs a bundle carries:

- ``train_step``: params, optimizer state, a batch, its labels and explicit uniforms -> new params,
  new state, metrics. A neutral-label pass feeds the softmax readout (and, for hard negatives, the
  wrong-label draw); then one pass over [positives; negatives] gives every layer its local
  gradient. All layers learn from the same pre-update weights, every minibatch.
- ``infer_goodness``: scores of every label for every row in one batched pass [B*N rows].
- ``infer_softmax``: one pass with the neutral label through the linear softmax readout.
"""

from __future__ import annotations

from ..errors import FFCompileError
from ..program.builder import Builder
from ..program.ir import Program, Value
from ..spec import Model
from . import labels as lbl
from .layer import forward, goodness, layer_input, local_gradient, normalize, peer_normalization
from .optimizers import apply_update
from .readouts import softmax, softmax_gradient, softmax_logits
from .state import param_specs, state_specs

PROGRAMS = ("train_step", "infer_goodness", "infer_softmax")


def build_program(model: Model, name: str, batch: int) -> Program:
    if model.recurrent is not None:
        raise FFCompileError(f"model {model.name!r}: recurrent networks are not lowered yet")
    if model.input.label.kind != "first_pixels":
        raise FFCompileError(f"model {model.name!r}: unsupervised (input.label.kind = \"none\") models are not lowered yet")
    builders = {"train_step": _train_step, "infer_goodness": _infer_goodness, "infer_softmax": _infer_softmax}
    if name not in builders:
        raise FFCompileError(f"unknown program {name!r} (known: {', '.join(PROGRAMS)})")
    if name == "infer_goodness" and not model.readout.goodness_layers:
        raise FFCompileError(f"model {model.name!r} has no goodness readout (readout.goodness_layers is empty)")
    if name == "infer_softmax" and not model.readout.softmax_layers:
        raise FFCompileError(f"model {model.name!r} has no softmax readout (readout.softmax_layers is empty)")
    if batch <= 0:
        raise FFCompileError(f"batch size must be positive, got {batch}")
    b = Builder(name)
    builders[name](b, model, batch)
    return b.build()


def _param_inputs(b: Builder, model: Model) -> dict[str, Value]:
    return {name: b.input(name, shape) for name, shape in param_specs(model).items()}


def _run_layers(b: Builder, rows: Value, params: dict[str, Value], model: Model, tag: str):
    """Forward pass through every layer; yields (i, layer input, z, y) per layer."""
    below = rows
    for i, layer in enumerate(model.layers):
        with b.scope(f"{tag}/{layer.name}"):
            x = layer_input(b, below, model, i)
            z, y = forward(b, x, params, model, i)
        yield i, x, z, y
        below = y


def _softmax_features(b: Builder, rows: Value, params, model: Model, tag: str) -> Value:
    chosen = {model.layer_index(n) for n in model.readout.softmax_layers}
    features = []
    for i, _x, _z, y in _run_layers(b, rows, params, model, tag):
        if i in chosen:
            with b.scope(f"{tag}/{model.layers[i].name}"):
                features.append(normalize(b, y, model))
        if i == max(chosen):
            break
    return features[0] if len(features) == 1 else b.concat(features, axis=1)


def _train_step(b: Builder, model: Model, batch: int) -> None:
    params = _param_inputs(b, model)
    state = {name: b.input(name, shape) for name, shape in state_specs(model).items()}
    x = b.input("x", (batch, model.input.size))
    labels = b.input("y", (batch,), "int64")
    u = b.input("u", (batch,))
    lr = b.input("lr", ())
    step = b.input("step", ()) if model.optimizer.kind == "adam" else None
    classes = model.input.label.classes
    grads: dict[str, Value] = {}
    metrics: dict[str, Value] = {}

    probs = None
    if model.readout.softmax_layers:
        features = _softmax_features(b, lbl.with_label(b, x, lbl.neutral_rows(b, batch, model), model), params, model, "neutral")
        with b.scope("softmax"):
            probs = softmax(b, softmax_logits(b, features, params))
            grads["softmax.weight"], grads["softmax.bias"], metrics["loss.softmax"] = softmax_gradient(b, features, probs, labels)

    if model.negatives.kind == "hard_label":
        weights = probs
    elif model.negatives.kind == "random_label":
        weights = b.constant([[0.0] * classes] * batch)  # plus min_prob: uniform over wrong labels
    else:
        raise FFCompileError(f"model {model.name!r}: negatives.kind {model.negatives.kind!r} is not lowered yet")
    negative_labels = lbl.sample_wrong_labels(b, weights, labels, u, model.negatives.min_prob)
    metrics["negative_labels"] = negative_labels

    positives = lbl.with_label(b, x, b.one_hot(labels, classes), model)
    negatives = lbl.with_label(b, x, b.one_hot(negative_labels, classes), model)
    rows = b.concat([positives, negatives], axis=0)
    new_state: dict[str, Value] = {}
    for i, xin, z, y in _run_layers(b, rows, params, model, "posneg"):
        name = model.layers[i].name
        with b.scope(f"posneg/{name}"):
            rule = local_gradient(b, xin, z, y, model, i, batch)
            dw, db = rule.weight, rule.bias
            if model.regularizers.peer_norm is not None:
                new_mean, pw, pb, ploss = peer_normalization(
                    b, b.slice(xin, 0, 0, batch), b.slice(y, 0, 0, batch), state[f"{name}.peer_mean"], model)
                dw, db = b.add(dw, pw), b.add(db, pb)
                new_state[f"{name}.peer_mean"] = new_mean
                metrics[f"loss_peer.{name}"] = ploss
        grads[f"{name}.weight"], grads[f"{name}.bias"] = dw, db
        metrics[f"loss.{name}"] = rule.loss
        metrics[f"goodness_pos.{name}"] = rule.goodness_pos
        metrics[f"goodness_neg.{name}"] = rule.goodness_neg

    new_params = {}
    for name in params:
        new_params[name], slots = apply_update(
            b, model, name, params[name], grads[name], state, lr, step, decay=name.endswith(".weight"))
        new_state.update(slots)
    for name in params:
        b.output(f"new.{name}", new_params[name])
    for name in state:
        b.output(f"new.{name}", new_state[name])
    for name, value in metrics.items():
        b.output(name, value)


def _infer_goodness(b: Builder, model: Model, batch: int) -> None:
    """Scores [B, N]: goodness summed over the readout layers, each label in turn; all N labelled
    copies of the batch go through the network as one [N*B]-row pass."""
    params = _param_inputs(b, model)
    x = b.input("x", (batch, model.input.size))
    classes = model.input.label.classes
    copies = [lbl.with_label(b, x, b.constant([[float(j == c) for j in range(classes)]] * batch), model)
              for c in range(classes)]
    rows = b.concat(copies, axis=0)
    chosen = {model.layer_index(n) for n in model.readout.goodness_layers}
    total = None
    for i, _x, _z, y in _run_layers(b, rows, params, model, "labelled"):
        if i in chosen:
            g = goodness(b, y, model)
            total = g if total is None else b.add(total, g)
        if i == max(chosen):
            break
    scores = b.transpose(b.reshape(total, [classes, batch]), [1, 0])
    b.output("scores", scores)
    b.output("prediction", b.argmax(scores, 1))


def _infer_softmax(b: Builder, model: Model, batch: int) -> None:
    params = _param_inputs(b, model)
    x = b.input("x", (batch, model.input.size))
    features = _softmax_features(b, lbl.with_label(b, x, lbl.neutral_rows(b, batch, model), model), params, model, "neutral")
    probs = softmax(b, softmax_logits(b, features, params))
    b.output("probs", probs)
    b.output("prediction", b.argmax(probs, 1))
