"""Next-character prediction (sec. 4.1, figure 4): a feed-forward net over the one-of-N codes of
the previous K characters, with a softmax from the normalized hidden activities to the next one.

Rows. ``x`` holds contexts (K codes, oldest first) and ``y`` the character that follows each.
The FF *positive* row of a prediction is the real K-character string ending in it: the context
shifted left by one code with ``y`` appended. Its *negative* row ends in a character the model
made up instead:

- ``teacher_forcing``: the first K-1 characters of the positive row, then a character drawn from
  the softmax on the context, among the characters other than the true one (so that a negative
  never equals its positive), with the explicit uniform ``u`` — inside the step, so a device
  makes its own negatives.
- ``self_generated``: the rows come from sequences the model generated from each string's first K
  characters; they are the step's input ``x_neg`` (made on the host with ``infer_softmax``, see
  ``ffcompile.loop.nextchar``), so they can be made long before the step ("offline, in a sleep phase").

Programs. ``train_step`` learns from positive and negative rows together; ``train_positive`` (the
softmax readout and the positive rows' FF gradients) and ``train_negative`` (the negative rows'
FF gradients) split it for ``training.phases = "separate"``. Both halves keep the 1/(2B) scale of
the joint loss, so their two updates sum to the joint gradient. ``training.learn_hidden = false``
(fig. 5's baseline) makes ``train_step`` learn the softmax only. ``infer_softmax`` predicts.
"""

from __future__ import annotations

from ..core.builder import Builder
from ..core.errors import FFCompileError
from ..core.family import train_programs
from ..core.program import Value
from ..core.spec import Model
from . import labels as lbl
from .layer import local_gradient, run_layers
from .optimizers import emit_updates
from .readouts import readout_features, softmax, softmax_gradient, softmax_logits
from .state import param_inputs, state_inputs

PHASES = {"train_step": "both", "train_positive": "positive", "train_negative": "negative"}


def build(b: Builder, model: Model, name: str, batch: int) -> None:
    if name == "infer_softmax":
        _infer_softmax(b, model, batch)
    elif name in PHASES and name in train_programs(model):
        _train(b, model, batch, PHASES[name])
    else:
        raise FFCompileError(f"model {model.name!r} predicts characters: its programs are "
                             f"{', '.join(train_programs(model) + ['infer_softmax'])}, not {name!r}")


def symbols(model: Model) -> int:
    return model.input.label.classes


def _ending_in(b: Builder, context: Value, codes: Value, model: Model) -> Value:
    """The K-character rows whose first K-1 characters are the context's last K-1, then ``codes``."""
    return b.concat([b.slice(context, 1, symbols(model), model.input.size), codes], axis=1)


def _train(b: Builder, model: Model, batch: int, phase: str) -> None:
    params = param_inputs(b, model)
    state = state_inputs(b, model)
    x = b.input("x", (batch, model.input.size))
    y = b.input("y", (batch,), "int64")
    teacher = model.negatives.kind == "teacher_forcing"
    negatives_needed = phase != "positive" and model.training.learn_hidden
    u = b.input("u", (batch,)) if negatives_needed and teacher else None
    x_neg = b.input("x_neg", (batch, model.input.size)) if negatives_needed and not teacher else None
    lr = b.input("lr", ())
    step = b.input("step", ()) if model.optimizer.kind == "adam" else None
    grads: dict[str, Value] = {}
    metrics: dict[str, Value] = {}

    probs = None
    if phase != "negative" or (negatives_needed and teacher):
        features = readout_features(b, x, params, model, "context")
        with b.scope("softmax"):
            probs = softmax(b, softmax_logits(b, features, params))
            if phase != "negative":
                grads["softmax.weight"], grads["softmax.bias"], metrics["loss.softmax"] = softmax_gradient(
                    b, features, probs, y)

    if model.training.learn_hidden:
        parts = []
        if phase != "negative":
            parts.append(_ending_in(b, x, b.one_hot(y, symbols(model)), model))
        if phase != "positive":
            if teacher:
                made_up = lbl.sample_wrong_labels(b, probs, y, u, model.negatives.min_prob)
                metrics["negative_labels"] = made_up
                parts.append(_ending_in(b, x, b.one_hot(made_up, symbols(model)), model))
            else:
                parts.append(x_neg)
        rows = parts[0] if len(parts) == 1 else b.concat(parts, axis=0)
        for i, xin, z, act in run_layers(b, rows, params, model, phase):
            name = model.layers[i].name
            with b.scope(f"{phase}/{name}"):
                rule = local_gradient(b, xin, z, act, model, i, batch, phase, y_is_relu=True)
            grads[f"{name}.weight"], grads[f"{name}.bias"] = rule.weight, rule.bias
            metrics[f"loss.{name}"] = rule.loss
            if rule.goodness_pos is not None:
                metrics[f"goodness_pos.{name}"] = rule.goodness_pos
            if rule.goodness_neg is not None:
                metrics[f"goodness_neg.{name}"] = rule.goodness_neg

    emit_updates(b, model, params, grads, state, {}, metrics, lr, step)


def _infer_softmax(b: Builder, model: Model, batch: int) -> None:
    params = param_inputs(b, model)
    x = b.input("x", (batch, model.input.size))
    features = readout_features(b, x, params, model, "context")
    probs = softmax(b, softmax_logits(b, features, params))
    b.output("probs", probs)
    b.output("prediction", b.argmax(probs, 1))
