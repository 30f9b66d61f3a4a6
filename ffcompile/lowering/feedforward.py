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
                "hybrid_negatives": _hybrid_negatives}
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


def _train_step(b: Builder, model: Model, batch: int) -> None:
    params = param_inputs(b, model)
    state = state_inputs(b, model)
    x = b.input("x", (batch, model.input.size))
    labels = b.input("y", (batch,), "int64")
    u = b.input("u", (batch,)) if supervised(model) else None
    lr = b.input("lr", ())
    step = b.input("step", ()) if model.optimizer.kind == "adam" else None
    grads: dict[str, Value] = {}
    metrics: dict[str, Value] = {}

    def learn_softmax(features: Value) -> Value:
        with b.scope("softmax"):
            probs = softmax(b, softmax_logits(b, features, params))
            grads["softmax.weight"], grads["softmax.bias"], metrics["loss.softmax"] = softmax_gradient(b, features, probs, labels)
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
    new_state: dict[str, Value] = {}
    positive_activities: dict[int, Value] = {}
    readout_layers = set() if supervised(model) else {model.layer_index(n) for n in model.readout.softmax_layers}
    for i, xin, z, y in run_layers(b, rows, params, model, "posneg"):
        name = model.layers[i].name
        with b.scope(f"posneg/{name}"):
            rule = local_gradient(b, xin, z, y, model, i, batch)
            dw, db = rule.weight, rule.bias
            if model.regularizers.peer_norm is not None:
                x_pos = b.slice(xin, 0, 0, batch)
                positive_activities[i] = b.slice(y, 0, 0, batch)
                new_mean, pw, pb, ploss = peer_normalization(
                    b, x_pos, positive_activities[i], state[f"{name}.peer_mean"], model, i)
                dw, db = b.add(dw, pw), b.add(db, pb)
                new_state[f"{name}.peer_mean"] = new_mean
                metrics[f"loss_peer.{name}"] = ploss
            elif i in readout_layers:
                positive_activities[i] = b.slice(y, 0, 0, batch)
        grads[f"{name}.weight"], grads[f"{name}.bias"] = dw, db
        metrics[f"loss.{name}"] = rule.loss
        metrics[f"goodness_pos.{name}"] = rule.goodness_pos
        metrics[f"goodness_neg.{name}"] = rule.goodness_neg

    if not supervised(model) and model.readout.softmax_layers:
        # the positive rows are the plain images: their pass already holds the readout's features
        features = [layer_feature(b, positive_activities[i], model, i, "posneg") for i in sorted(readout_layers)]
        learn_softmax(features[0] if len(features) == 1 else b.concat(features, axis=1))

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
