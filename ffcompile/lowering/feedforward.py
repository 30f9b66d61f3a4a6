"""The programs of a feed-forward model:

- ``train_step``: params, optimizer state, a batch, its labels and explicit uniforms -> new params,
  new state, metrics. A neutral-label pass feeds the softmax readout (and, for hard negatives, the
  wrong-label draw); then one pass over [positives; negatives] gives every layer its local
  gradient. All layers learn from the same pre-update weights, every minibatch.
- ``infer_goodness``: scores of every label for every row in one batched pass [B*N rows].
- ``infer_softmax``: one pass with the neutral label through the linear softmax readout.

Unsupervised models (``input.label.kind = "none"``, sec. 3.2) take no label pixels: the
positives are the images, the negatives hybrid images made inside the step (``hybrid``) from
``x_other`` (a digit of a different class, chosen on the host) and ``mask_bits``. Their softmax
readout learns from the positive rows' normalized activities in the same step (labels ``y``),
without backprop into the hidden layers, and ``infer_softmax`` runs the plain images.
``hybrid_negatives`` (not part of a bundle) makes just the negatives, for tests and pictures.

Recurrent nets (sec. 3.4) are lowered by ``recurrent``, next-character models (sec. 4.1) by
``nextchar``; ``ffcompile.lowering.build_program`` picks the lowering of the model's family.
"""

from __future__ import annotations

from ..core.builder import Builder
from ..core.errors import FFCompileError
from ..core.program import Value
from ..core.spec import Model
from . import labels as lbl
from .hybrid import hybrid_images
from .layer import goodness, local_gradient, peer_normalization, run_layers
from .optimizers import emit_updates
from .readouts import layer_feature, readout_features, softmax, softmax_gradient, softmax_logits
from .state import param_inputs, state_inputs

def build(b: Builder, model: Model, name: str, batch: int) -> None:
    builders = {"train_step": _train_step, "infer_goodness": _infer_goodness, "infer_softmax": _infer_softmax,
                "hybrid_negatives": _hybrid_negatives, "train_gradients": _train_gradients, "train_apply": _train_apply}
    if name not in builders:
        raise FFCompileError(f"unknown program {name!r} (known: {', '.join(builders)})")
    hybrid = model.negatives.kind == "hybrid_image"
    if not supervised(model) and not hybrid:
        raise FFCompileError(f"model {model.name!r}: unsupervised models are lowered with negatives.kind = "
                             f"\"hybrid_image\" only, not {model.negatives.kind!r}")
    if supervised(model) and hybrid:
        raise FFCompileError(f"model {model.name!r}: hybrid-image negatives are lowered for unsupervised models "
                             "only (input.label.kind = \"none\")")
    if name == "hybrid_negatives" and not hybrid:
        raise FFCompileError(f"model {model.name!r} does not use hybrid-image negatives (negatives.kind = "
                             f"{model.negatives.kind!r})")
    if name == "infer_goodness" and not supervised(model):
        raise FFCompileError(f"model {model.name!r} is unsupervised (input.label.kind = \"none\"): the goodness "
                             "readout scores labels in the input, so it has none; use the softmax readout")
    if name == "infer_goodness" and not model.readout.goodness_layers:
        raise FFCompileError(f"model {model.name!r} has no goodness readout (readout.goodness_layers is empty)")
    if name == "infer_softmax" and not model.readout.softmax_layers:
        raise FFCompileError(f"model {model.name!r} has no softmax readout (readout.softmax_layers is empty)")
    builders[name](b, model, batch)


def supervised(model: Model) -> bool:
    return model.input.label.kind != "none"


def readout_rows(b: Builder, x: Value, model: Model) -> Value:
    """What the softmax readout runs on: the image with the neutral label, or just the image."""
    return lbl.with_neutral_label(b, x, model) if supervised(model) else x


def _label_negatives(b: Builder, x: Value, labels: Value, u: Value, probs: Value | None, model: Model, batch: int,
                     metrics):
    """(positives, negatives) for supervised FF: the image with its label / with a wrong one."""
    classes = model.input.label.classes
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
    return positives, negatives


def _hybrid_inputs(b: Builder, model: Model, batch: int) -> tuple[Value, Value]:
    return b.input("x_other", (batch, model.input.size)), b.input("mask_bits", (batch, model.input.size))


def _batch_inputs(b: Builder, model: Model, batch: int):
    x = b.input("x", (batch, model.input.size))
    labels = b.input("y", (batch,), "int64")
    u = b.input("u", (batch,)) if supervised(model) else None
    return x, labels, u


def _schedule_inputs(b: Builder, model: Model):
    return b.input("lr", ()), b.input("step", ()) if model.optimizer.kind == "adam" else None


def _train_step(b: Builder, model: Model, batch: int) -> None:
    params = param_inputs(b, model)
    state = state_inputs(b, model)
    x, labels, u = _batch_inputs(b, model, batch)
    lr, step = _schedule_inputs(b, model)
    grads, sums, metrics = _gradients(b, model, params, x, labels, u, batch, norm=batch)
    _apply(b, model, params, state, grads, sums, metrics, lr, step, batch)


def _train_gradients(b: Builder, model: Model, batch: int) -> None:
    """One shard of ``batch`` rows of a train step whose batch is ``training.batch_size``: every
    gradient scaled by 1 / training.batch_size, and the sums peer normalization needs. Summed over
    the shards (an all-reduce), they are exactly the whole batch's; ``train_apply`` then finishes
    the step. Outputs ``grad.<param>``, ``peer.x_sum.<layer>``, ``peer.y_sum.<layer>`` and the
    metrics, each a shard's share of the whole batch's value."""
    params = param_inputs(b, model)
    x, labels, u = _batch_inputs(b, model, batch)
    grads, sums, metrics = _gradients(b, model, params, x, labels, u, batch, norm=model.training.batch_size)
    for name, value in {**{f"grad.{k}": v for k, v in grads.items()}, **sums, **metrics}.items():
        b.output(name, value)


def _train_apply(b: Builder, model: Model, batch: int) -> None:
    """The rest of a train step from the whole batch's gradients and sums (``train_gradients``,
    summed over shards): peer normalization and the optimizer. ``batch`` is not used: the batch
    is ``training.batch_size``."""
    params = param_inputs(b, model)
    state = state_inputs(b, model)
    grads = {name: b.input(f"grad.{name}", value.shape) for name, value in params.items()}
    sums = {}
    if model.regularizers.peer_norm is not None:
        for i, layer in enumerate(model.layers):
            sums[f"peer.x_sum.{layer.name}"] = b.input(f"peer.x_sum.{layer.name}", (1, model.fan_in(i)))
            sums[f"peer.y_sum.{layer.name}"] = b.input(f"peer.y_sum.{layer.name}", (layer.size,))
    lr, step = _schedule_inputs(b, model)
    _apply(b, model, params, state, grads, sums, {}, lr, step, model.training.batch_size)


def _gradients(b: Builder, model: Model, params: dict[str, Value], x: Value, labels: Value, u: Value | None,
               batch: int, norm: int) -> tuple[dict[str, Value], dict[str, Value], dict[str, Value]]:
    """Everything of a train step that reads the batch's rows: (gradients of the local rules and
    the softmax readout, the positive rows' sums for peer normalization, metrics), with means over
    the batch taken as sums / ``norm``."""
    grads: dict[str, Value] = {}
    sums: dict[str, Value] = {}
    metrics: dict[str, Value] = {}

    def learn_softmax(features: Value) -> Value:
        with b.scope("softmax"):
            probs = softmax(b, softmax_logits(b, features, params))
            grads["softmax.weight"], grads["softmax.bias"], metrics["loss.softmax"] = softmax_gradient(
                b, features, probs, labels, norm)
        return probs

    if supervised(model):
        probs = None
        if model.readout.softmax_layers:
            probs = learn_softmax(readout_features(b, readout_rows(b, x, model), params, model, "neutral"))
        positives, negatives = _label_negatives(b, x, labels, u, probs, model, batch, metrics)
    else:
        x_other, bits = _hybrid_inputs(b, model, batch)
        positives, negatives = x, hybrid_images(b, x, x_other, bits, model)[0]

    rows = b.concat([positives, negatives], axis=0)
    positive_activities: dict[int, Value] = {}
    readout_layers = set() if supervised(model) else {model.layer_index(n) for n in model.readout.softmax_layers}
    for i, xin, z, y in run_layers(b, rows, params, model, "posneg"):
        name = model.layers[i].name
        with b.scope(f"posneg/{name}"):
            rule = local_gradient(b, xin, z, y, model, i, batch, norm=norm)
            if model.regularizers.peer_norm is not None or i in readout_layers:
                positive_activities[i] = b.slice(y, 0, 0, batch)
            if model.regularizers.peer_norm is not None:
                with b.scope("peer_norm"):
                    sums[f"peer.x_sum.{name}"] = b.reduce_sum(b.slice(xin, 0, 0, batch), [0], keepdims=True)
                    sums[f"peer.y_sum.{name}"] = b.reduce_sum(positive_activities[i], [0])
        grads[f"{name}.weight"], grads[f"{name}.bias"] = rule.weight, rule.bias
        metrics[f"loss.{name}"] = rule.loss
        metrics[f"goodness_pos.{name}"] = rule.goodness_pos
        metrics[f"goodness_neg.{name}"] = rule.goodness_neg

    if not supervised(model) and model.readout.softmax_layers:
        # the positive rows are the plain images: their pass already holds the readout's features
        features = [layer_feature(b, positive_activities[i], model, i, "posneg") for i in sorted(readout_layers)]
        learn_softmax(features[0] if len(features) == 1 else b.concat(features, axis=1))
    return grads, sums, metrics


def _apply(b: Builder, model: Model, params: dict[str, Value], state: dict[str, Value], grads: dict[str, Value],
           sums: dict[str, Value], metrics: dict[str, Value], lr: Value, step: Value | None, batch: int) -> None:
    """Peer normalization from the batch's sums, then the optimizer update and the outputs."""
    new_state: dict[str, Value] = {}
    for i, layer in enumerate(model.layers if model.regularizers.peer_norm is not None else ()):
        name = layer.name
        with b.scope(f"posneg/{name}"):
            new_mean, pw, pb, ploss = peer_normalization(
                b, sums[f"peer.x_sum.{name}"], sums[f"peer.y_sum.{name}"], state[f"{name}.peer_mean"], model, i, batch)
        grads[f"{name}.weight"] = b.add(grads[f"{name}.weight"], pw)
        grads[f"{name}.bias"] = b.add(grads[f"{name}.bias"], pb)
        new_state[f"{name}.peer_mean"] = new_mean
        metrics[f"loss_peer.{name}"] = ploss
    emit_updates(b, model, params, grads, state, new_state, metrics, lr, step)


def _infer_goodness(b: Builder, model: Model, batch: int) -> None:
    """Scores [B, N]: goodness summed over the readout layers, each label in turn; all N labelled
    copies of the batch go through the network as one [N*B]-row pass."""
    params = param_inputs(b, model)
    x = b.input("x", (batch, model.input.size))
    classes = model.input.label.classes
    copies = [lbl.with_constant_label(b, x, [float(j == c) for j in range(classes)], model) for c in range(classes)]
    rows = b.concat(copies, axis=0)
    chosen = {model.layer_index(n) for n in model.readout.goodness_layers}
    total = None
    for i, _x, _z, y in run_layers(b, rows, params, model, "labelled"):
        if i in chosen:
            g = goodness(b, y, model)
            total = g if total is None else b.add(total, g)
        if i == max(chosen):
            break
    scores = b.transpose(b.reshape(total, [classes, -1]), [1, 0])
    b.output("scores", scores)
    b.output("prediction", b.argmax(scores, 1))


def _infer_softmax(b: Builder, model: Model, batch: int) -> None:
    params = param_inputs(b, model)
    x = b.input("x", (batch, model.input.size))
    features = readout_features(b, readout_rows(b, x, model), params, model, "neutral")
    probs = softmax(b, softmax_logits(b, features, params))
    b.output("probs", probs)
    b.output("prediction", b.argmax(probs, 1))


def _hybrid_negatives(b: Builder, model: Model, batch: int) -> None:
    x = b.input("x", (batch, model.input.size))
    x_other, bits = _hybrid_inputs(b, model, batch)
    negatives, mask = hybrid_images(b, x, x_other, bits, model)
    b.output("negatives", negatives)
    b.output("mask", mask)
