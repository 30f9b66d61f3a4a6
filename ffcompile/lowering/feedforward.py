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

from math import prod

from ..core.builder import Builder
from ..core.errors import FFCompileError
from ..core.program import Value
from ..core.spec import Model
from . import labels as lbl
from .hybrid import hybrid_images
from .layer import LabelledRows, SharedImage, as_value, goodness, local_gradient, peer_normalization, run_layers
from .optimizers import emit_updates
from .readouts import layer_feature, readout_features, readout_pass, side_by_side, softmax, softmax_gradient, softmax_logits
from .state import param_inputs, param_specs, state_inputs, state_specs

def build(b: Builder, model: Model, name: str, batch: int) -> None:
    builders = {"train_step": _train_step, "infer_goodness": _infer_goodness, "infer_softmax": _infer_softmax,
                "hybrid_negatives": _hybrid_negatives, "train_gradients": _train_gradients, "train_apply": _train_apply}
    if name not in builders:
        raise FFCompileError(f"unknown program {name!r} (known: {', '.join(builders)})")
    _check_negatives(model)
    _check_program(model, name)
    builders[name](b, model, batch)


def _check_negatives(model: Model) -> None:
    hybrid = model.negatives.kind == "hybrid_image"
    if not supervised(model) and not hybrid:
        raise FFCompileError(f"model {model.name!r}: unsupervised models are lowered with negatives.kind = "
                             f"\"hybrid_image\" only, not {model.negatives.kind!r}")
    if supervised(model) and hybrid:
        raise FFCompileError(f"model {model.name!r}: hybrid-image negatives are lowered for unsupervised models "
                             "only (input.label.kind = \"none\")")


def _check_program(model: Model, name: str) -> None:
    if name == "hybrid_negatives" and model.negatives.kind != "hybrid_image":
        raise FFCompileError(f"model {model.name!r} does not use hybrid-image negatives (negatives.kind = "
                             f"{model.negatives.kind!r})")
    if name == "infer_goodness" and not supervised(model):
        raise FFCompileError(f"model {model.name!r} is unsupervised (input.label.kind = \"none\"): the goodness "
                             "readout scores labels in the input, so it has none; use the softmax readout")
    if name == "infer_goodness" and not model.readout.goodness_layers:
        raise FFCompileError(f"model {model.name!r} has no goodness readout (readout.goodness_layers is empty)")
    if name == "infer_softmax" and not model.readout.softmax_layers:
        raise FFCompileError(f"model {model.name!r} has no softmax readout (readout.softmax_layers is empty)")


def supervised(model: Model) -> bool:
    return model.input.label.kind != "none"


def readout_rows(b: Builder, x: Value, model: Model, shared: SharedImage | None = None) -> Value | LabelledRows:
    """What the softmax readout runs on: the image with the neutral label, or just the image.
    ``shared``: x's image as other passes of the program read it (default: read by this one alone)."""
    if not supervised(model):
        return x
    return LabelledRows(shared or SharedImage(x, model.input.label.classes, 1), [lbl.neutral_label(b, x, model)])


def _negative_labels(b: Builder, labels: Value, u: Value, probs: Value | None, model: Model, batch: int,
                     metrics) -> Value:
    """A wrong label for every row: drawn from the softmax readout's ``probs`` (hard negatives) or
    uniformly."""
    classes = model.input.label.classes
    if model.negatives.kind == "hard_label":
        weights = probs
    elif model.negatives.kind == "random_label":
        weights = b.constant([[0.0] * classes] * batch)  # plus min_prob: uniform over wrong labels
    else:
        raise FFCompileError(f"model {model.name!r}: negatives.kind {model.negatives.kind!r} is not lowered yet")
    negative_labels = lbl.sample_wrong_labels(b, weights, labels, u, model.negatives.min_prob)
    metrics["negative_labels"] = negative_labels
    return negative_labels


def _posneg_rows(b: Builder, shared: SharedImage, labels: Value, negative_labels: Value, model: Model) -> LabelledRows:
    """[positives; negatives] for supervised FF: the image with its label / with a wrong one."""
    classes = model.input.label.classes
    return LabelledRows(shared, [b.one_hot(labels, classes), b.one_hot(negative_labels, classes)])


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
    _apply(b, model, params, state, grads, sums, metrics, lr, step, batch, range(len(model.layers)))


def _train_gradients(b: Builder, model: Model, batch: int) -> None:
    """One shard of ``batch`` rows of a train step whose batch is ``training.batch_size``: every
    gradient scaled by 1 / training.batch_size, and the sums peer normalization needs. Summed over
    the shards (an all-reduce), they are exactly the whole batch's; ``train_apply`` then finishes
    the step. Outputs ``grad.<param>``, ``peer.x_sum.<layer>``, ``peer.y_sum.<layer>`` and the
    metrics, each a shard's share of the whole batch's value."""
    params = param_inputs(b, model)
    x, labels, u = _batch_inputs(b, model, batch)
    grads, sums, metrics = _gradients(b, model, params, x, labels, u, batch, norm=model.training.batch_size)
    _outputs(b, grads, sums, metrics)


def _train_apply(b: Builder, model: Model, batch: int) -> None:
    """The rest of a train step from the whole batch's gradients and sums (``train_gradients``,
    summed over shards): peer normalization and the optimizer. ``batch`` is not used: the batch
    is ``training.batch_size``."""
    _stage_apply(b, model, batch, range(len(model.layers)))


def _gradients(b: Builder, model: Model, params: dict[str, Value], x: Value, labels: Value, u: Value | None,
               batch: int, norm: int) -> tuple[dict[str, Value], dict[str, Value], dict[str, Value]]:
    """Everything of a train step that reads the batch's rows: (gradients of the local rules and
    the softmax readout, the positive rows' sums for peer normalization, metrics), with means over
    the batch taken as sums / ``norm``."""
    grads: dict[str, Value] = {}
    sums: dict[str, Value] = {}
    metrics: dict[str, Value] = {}
    every = range(len(model.layers))
    if supervised(model):
        probs = None
        # the neutral pass (if any) and the positive and negative rows share the image
        shared = SharedImage(x, model.input.label.classes, 2 + bool(model.readout.softmax_layers))
        if model.readout.softmax_layers:
            features, _ = readout_pass(b, readout_rows(b, x, model, shared), params, model, "neutral", every)
            probs = _learn_softmax(b, side_by_side(b, features), params, labels, norm, grads, metrics)
        rows = _posneg_rows(b, shared, labels, _negative_labels(b, labels, u, probs, model, batch, metrics), model)
    else:
        rows = _hybrid_rows(b, model, x, batch)
    features, _ = _posneg_pass(b, model, params, rows, every, batch, norm, grads, sums, metrics)
    if features:
        _learn_softmax(b, side_by_side(b, features), params, labels, norm, grads, metrics)
    return grads, sums, metrics


def _hybrid_rows(b: Builder, model: Model, x: Value, batch: int) -> Value:
    x_other, bits = _hybrid_inputs(b, model, batch)
    return b.concat([x, hybrid_images(b, x, x_other, bits, model)[0]], axis=0)


def _learn_softmax(b: Builder, features: Value, params: dict[str, Value], labels: Value, norm: int,
                   grads: dict[str, Value], metrics: dict[str, Value]) -> Value:
    """The softmax readout's probabilities for ``features``; its gradient and loss go to ``grads``
    and ``metrics``."""
    with b.scope("softmax"):
        probs = softmax(b, softmax_logits(b, features, params))
        grads["softmax.weight"], grads["softmax.bias"], metrics["loss.softmax"] = softmax_gradient(
            b, features, probs, labels, norm)
    return probs


def _posneg_pass(b: Builder, model: Model, params: dict[str, Value], rows: Value, layers: range, batch: int,
                 norm: int, grads: dict[str, Value], sums: dict[str, Value],
                 metrics: dict[str, Value]) -> tuple[list[Value], Value]:
    """The [positives; negatives] rows through ``layers``: each layer's local gradient, peer
    normalization's sums and metrics into ``grads``, ``sums``, ``metrics``. Returns (the softmax
    readout's features among these layers, which unsupervised models take from the positive rows;
    the last layer's activities)."""
    positive_activities: dict[int, Value] = {}
    readout_layers = set() if supervised(model) else {model.layer_index(n) for n in model.readout.softmax_layers}
    y = rows
    for i, xin, z, y in run_layers(b, rows, params, model, "posneg", layers):
        name = model.layers[i].name
        with b.scope(f"posneg/{name}"):
            rule = local_gradient(b, xin, z, y, model, i, batch, norm=norm, y_is_relu=True)
            if model.regularizers.peer_norm is not None or i in readout_layers:
                positive_activities[i] = b.slice(y, 0, 0, batch)
            if model.regularizers.peer_norm is not None:
                with b.scope("peer_norm"):
                    sums[f"peer.x_sum.{name}"] = b.reduce_sum(b.slice(as_value(b, xin), 0, 0, batch), [0], keepdims=True)
                    sums[f"peer.y_sum.{name}"] = b.reduce_sum(positive_activities[i], [0])
        grads[f"{name}.weight"], grads[f"{name}.bias"] = rule.weight, rule.bias
        metrics[f"loss.{name}"] = rule.loss
        metrics[f"goodness_pos.{name}"] = rule.goodness_pos
        metrics[f"goodness_neg.{name}"] = rule.goodness_neg
    # the positive rows are the plain images: their pass already holds the readout's features
    features = [layer_feature(b, positive_activities[i], model, i, "posneg") for i in sorted(readout_layers & set(layers))]
    return features, y


def _apply(b: Builder, model: Model, params: dict[str, Value], state: dict[str, Value], grads: dict[str, Value],
           sums: dict[str, Value], metrics: dict[str, Value], lr: Value, step: Value | None, batch: int,
           layers: range) -> None:
    """Peer normalization of ``layers`` from the batch's sums, then the optimizer update of
    ``params`` and the outputs."""
    new_state: dict[str, Value] = {}
    for i in layers if model.regularizers.peer_norm is not None else ():
        name = model.layers[i].name
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
    rows = LabelledRows(SharedImage(x, classes, classes),
                        [lbl.constant_label(b, x, [float(j == c) for j in range(classes)], model) for c in range(classes)])
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


# Layer-pipelined training (``ffcompile.reference.distributed.PipelineStep``): process r of a job
# owns a stage, a contiguous range of layers (and the softmax readout if its highest layer is
# there), and runs the stage's programs on micro-batches of the batch, streaming activities to the
# next stage. Their gradients, like ``train_gradients``', are scaled by 1 / training.batch_size, so
# the micro-batches' sums are the whole batch's.
#
# - ``stage_neutral`` (supervised models with a softmax readout, stages up to the readout's): the
#   neutral-label pass through the stage's layers. In: ``x`` (first stage) or ``neutral.in``, the
#   activities of the layer below; ``features.in``, the readout features of the layers below. Out:
#   ``neutral.out`` and ``features.out`` for the next stage or, on the readout's stage, the
#   readout's gradient, ``loss.softmax`` and (hard negatives) ``negative_labels``.
# - ``stage_posneg``: the [positives; negatives] rows through the stage's layers. In: the batch
#   (first stage; hard negatives also ``negative_labels``) or ``posneg.in``; unsupervised models'
#   ``features.in``. Out: the layers' gradients, peer sums and metrics; ``posneg.out`` (and
#   ``features.out``) for the next stage; an unsupervised readout's gradient on its stage.
# - ``stage_apply``: ``train_apply`` for the stage's own parameters.

STAGE_PROGRAMS = ("stage_neutral", "stage_posneg", "stage_apply")


def build_stage(b: Builder, model: Model, name: str, batch: int, layers: range) -> None:
    builders = {"stage_neutral": _stage_neutral, "stage_posneg": _stage_posneg, "stage_apply": _stage_apply}
    if name not in builders:
        raise FFCompileError(f"unknown stage program {name!r} (known: {', '.join(builders)})")
    _check_negatives(model)
    if name == "stage_neutral" and not runs_neutral_pass(model, layers):
        raise FFCompileError(f"model {model.name!r}: layers {layers.start}..{layers.stop - 1} take no part in the "
                             "neutral pass")
    builders[name](b, model, batch, layers)


def pipeline_stages(model: Model, count: int) -> list[range]:
    """``count`` contiguous, non-empty ranges of layers that make the largest stage's weights (the
    work of its layers) as small as possible; earlier stages are preferred larger on ties."""
    n = len(model.layers)
    if not 0 < count <= n:
        raise FFCompileError(f"model {model.name!r} has {n} layers: it cannot be split into {count} pipeline stages "
                             "(use at most one process per layer)")
    cost = [prod(param_specs(model)[f"{layer.name}.weight"]) for layer in model.layers]
    # best[k][j]: the smallest largest stage when layers [0, j) form k stages; cut[k][j]: its last stage's start
    best = [[0] + [float("inf")] * n] + [[float("inf")] * (n + 1) for _ in range(count)]
    cut = [[0] * (n + 1) for _ in range(count + 1)]
    for k in range(1, count + 1):
        for j in range(k, n + 1):
            for i in range(j - 1, k - 2, -1):
                worst = max(best[k - 1][i], sum(cost[i:j]))
                if worst < best[k][j]:
                    best[k][j], cut[k][j] = worst, i
    stages, j = [], n
    for k in range(count, 0, -1):
        stages.insert(0, range(cut[k][j], j))
        j = cut[k][j]
    return stages


def readout_layer(model: Model) -> int | None:
    """The highest layer the softmax readout reads (None without one)."""
    return max((model.layer_index(n) for n in model.readout.softmax_layers), default=None)


def owns_readout(model: Model, layers: range) -> bool:
    return readout_layer(model) in layers


def runs_neutral_pass(model: Model, layers: range) -> bool:
    top = readout_layer(model)
    return supervised(model) and top is not None and layers.start <= top


def stage_params(model: Model, layers: range) -> set[str]:
    """The parameters a stage owns: its layers' and, on the readout's stage, the readout's."""
    names = {f"{model.layers[i].name}.{kind}" for i in layers for kind in ("weight", "bias")}
    return names | ({"softmax.weight", "softmax.bias"} if owns_readout(model, layers) else set())


def stage_state(model: Model, layers: range) -> set[str]:
    """The optimizer state (and peer means) of a stage's parameters and layers."""
    owners = stage_params(model, layers) | {model.layers[i].name for i in layers}
    return {name for name in state_specs(model) if name.rsplit(".", 1)[0] in owners}


def _features_below(model: Model, layers: range) -> int:
    """Width of the readout features the layers below ``layers`` pass up to it (0: none)."""
    top = readout_layer(model)
    if top is None or top < layers.start:
        return 0
    return sum(model.layers[model.layer_index(n)].size for n in model.readout.softmax_layers
               if model.layer_index(n) < layers.start)


def _stream_in(b: Builder, model: Model, name: str, rows: int, layers: range) -> Value:
    return b.input(f"{name}.in", (rows, model.layers[layers.start - 1].size))


def _features_so_far(b: Builder, model: Model, features: list[Value], layers: range, below: int, rows: int) -> list[Value]:
    """The readout features so far: those from below (input ``features.in``) then these layers'."""
    return ([b.input("features.in", (rows, below))] if below else []) + features


def _stage_neutral(b: Builder, model: Model, batch: int, layers: range) -> None:
    params = param_inputs(b, model, stage_params(model, layers))
    first = layers.start == 0
    rows = readout_rows(b, b.input("x", (batch, model.input.size)), model) if first else \
        _stream_in(b, model, "neutral", batch, layers)
    features, y = readout_pass(b, rows, params, model, "neutral", layers)
    features = _features_so_far(b, model, features, layers, _features_below(model, layers), batch)
    if not owns_readout(model, layers):
        b.output("neutral.out", y)
        if features:
            b.output("features.out", side_by_side(b, features))
        return
    grads, metrics = {}, {}
    labels = b.input("y", (batch,), "int64")
    probs = _learn_softmax(b, side_by_side(b, features), params, labels, model.training.batch_size, grads, metrics)
    if model.negatives.kind == "hard_label":
        _negative_labels(b, labels, b.input("u", (batch,)), probs, model, batch, metrics)
    _outputs(b, grads, {}, metrics)


def _stage_posneg(b: Builder, model: Model, batch: int, layers: range) -> None:
    params = param_inputs(b, model, stage_params(model, layers))
    norm = model.training.batch_size
    grads, sums, metrics = {}, {}, {}
    labels = None
    if layers.start > 0:
        rows = _stream_in(b, model, "posneg", 2 * batch, layers)
    elif supervised(model):
        x, labels = b.input("x", (batch, model.input.size)), b.input("y", (batch,), "int64")
        if model.negatives.kind == "hard_label":
            negative_labels = b.input("negative_labels", (batch,), "int64")
        else:
            negative_labels = _negative_labels(b, labels, b.input("u", (batch,)), None, model, batch, metrics)
        rows = _posneg_rows(b, SharedImage(x, model.input.label.classes, 2), labels, negative_labels, model)
    else:
        rows = _hybrid_rows(b, model, b.input("x", (batch, model.input.size)), batch)
    features, y = _posneg_pass(b, model, params, rows, layers, batch, norm, grads, sums, metrics)
    if not supervised(model):
        features = _features_so_far(b, model, features, layers, _features_below(model, layers), batch)
        if owns_readout(model, layers):
            labels = labels if labels is not None else b.input("y", (batch,), "int64")
            _learn_softmax(b, side_by_side(b, features), params, labels, norm, grads, metrics)
        elif features and readout_layer(model) >= layers.stop:
            b.output("features.out", side_by_side(b, features))
    if layers.stop < len(model.layers):
        b.output("posneg.out", y)
    _outputs(b, grads, sums, metrics)


def _outputs(b: Builder, grads: dict[str, Value], sums: dict[str, Value], metrics: dict[str, Value]) -> None:
    for name, value in {**{f"grad.{k}": v for k, v in grads.items()}, **sums, **metrics}.items():
        b.output(name, value)


def _stage_apply(b: Builder, model: Model, batch: int, layers: range) -> None:
    params = param_inputs(b, model, stage_params(model, layers))
    state = state_inputs(b, model, stage_state(model, layers))
    grads = {name: b.input(f"grad.{name}", value.shape) for name, value in params.items()}
    sums = {}
    if model.regularizers.peer_norm is not None:
        for i in layers:
            name = model.layers[i].name
            sums[f"peer.x_sum.{name}"] = b.input(f"peer.x_sum.{name}", (1, model.fan_in(i)))
            sums[f"peer.y_sum.{name}"] = b.input(f"peer.y_sum.{name}", (model.layers[i].size,))
    lr, step = _schedule_inputs(b, model)
    _apply(b, model, params, state, grads, sums, {}, lr, step, model.training.batch_size, layers)
