"""A static image treated as a boring video (sec. 3.4, figure 3): pixels at the bottom, a one-of-N
label layer on top, hidden layers between, each receiving the normalized states of the layer
below and the layer above. Hidden layers are dense, or local (sec. 4, CIFAR-10: topographic maps
whose units see a window of the map or image below and, through the same window, of the map
above; the last hidden layer sees the whole label; ``local``).

State dynamics. Iteration 0 is one bottom-up pass (no top-down input yet). At every later
iteration all hidden layers update synchronously from the states at the previous iteration:

    z_t   = W_up · norm(h_{t-1} below) + W_down · norm(h_{t-1} above) + b
    h_t   = damping · h_{t-1} + (1 - damping) · relu(z_t)

``h`` is the pre-normalized state (the rectified activities the layer normalizes and sends on);
the bottom "state" is the image, the top one the label's one-of-N vector, both clamped.

Learning. Each hidden layer at each iteration 1..T has its own FF loss on the goodness of h_t
(eq. 1). Inputs from other layers and the layer's own h_{t-1} are constants — no
backpropagation through time — so dh_t/dz_t = (1 - damping) · step(z_t) and the per-iteration
gradients of W_up, W_down and b are summed over the iterations.

Readouts. Goodness: each label in turn sits on top; the score is the goodness (summed over
``readout.goodness_layers``, all hidden layers if empty) averaged over iterations
``readout_iterations[0]..[1]`` inclusive; later iterations cannot change it, so inference unrolls
only that far. One-pass softmax (table 1): the bottom-up pass alone (it never sees the label), a
linear softmax on the normalized states of ``readout.softmax_layers``, learned in the train step
from the positive images' bottom-up pass, with no gradient into the hidden layers.

Negatives (sec. 3.4: "a single forward pass through the net to get probabilities for all the
classes"). In this net a bottom-up pass never sees the label, so the single pass is: the
bottom-up pass, then one synchronous iteration with each label on top; the softmax over labels
of the summed goodness after that iteration gives the probabilities from which a wrong label is
drawn in proportion (``labels.sample_wrong_labels``). Only the top hidden layer's goodness differs
between labels after one iteration, so only it is run once per label.
"""

from __future__ import annotations

import numpy as np

from ..core.builder import Builder
from ..core.errors import FFCompileError
from ..core.program import Value
from ..core.spec import Model
from . import labels as lbl
from . import local
from .layer import forward, goodness, layer_input, local_gradient, normalize
from .optimizers import emit_updates
from .readouts import softmax, softmax_gradient, softmax_logits
from .state import param_inputs, state_inputs

def build(b: Builder, model: Model, name: str, batch: int) -> None:
    builders = {"train_step": _train_step, "infer_goodness": _infer_goodness, "infer_softmax": _infer_softmax,
                "recurrent_states": _states, "negative_probs": _negative_probs}
    known = [p for p in builders if p != "infer_softmax" or model.readout.softmax_layers]
    if name not in known:
        raise FFCompileError(f"model {model.name!r} is recurrent: its programs are {', '.join(known)}, not {name!r}"
                             + (" (readout.softmax_layers is empty)" if name == "infer_softmax" else ""))
    builders[name](b, model, batch)


def top_down(b: Builder, model: Model, params: dict[str, Value], i: int, above: Value) -> Value:
    """Layer i's input from the normalized layer above (or the label rows), no bias."""
    weight = params[f"{model.layers[i].name}.top_down.weight"]
    if local.has_local_top_down(model, i):
        return local.apply(b, above, weight, local.top_down_geometry(model, i))
    return b.matmul(above, weight, trans_b=True)


def top_down_gradient(b: Builder, model: Model, i: int, dz: Value, above: Value) -> Value:
    if local.has_local_top_down(model, i):
        return local.gradient(b, dz, above, local.top_down_geometry(model, i))
    return b.matmul(dz, above, trans_a=True)


def scored_layers(model: Model) -> list[int]:
    chosen = model.readout.goodness_layers
    return sorted(model.layer_index(n) for n in chosen) if chosen else list(range(len(model.layers)))


def damped(b: Builder, model: Model, previous: Value, z: Value) -> Value:
    """The new pre-normalized state: damping * previous + (1 - damping) * relu(z)."""
    damping = model.recurrent.damping
    return b.add(b.mul(previous, damping), b.mul(b.relu(z), 1.0 - damping))


class Unrolled:
    """The network's states over the iterations for one set of rows. ``pixels``: the bottom layer
    as the first hidden layer sees it; ``label``: the top layer's normalized one-of-N rows."""

    def __init__(self, b: Builder, model: Model, params: dict[str, Value], pixels: Value, label: Value, tag: str):
        self.b, self.model, self.params, self.pixels, self.label, self.tag = b, model, params, pixels, label, tag
        self.states: list[Value] = []
        self.first: list[Value] = []  # iteration 0 of one copy of the rows
        self.t = 0

    def bottom_up(self, x: Value, copies: int = 1, layers: int | None = None) -> None:
        """Iteration 0 from the image rows ``x``; ``copies``: the states are tiled that many times
        (the pass does not depend on the label, so labelled copies share it); ``layers``: stop
        after that many (a readout that needs no more)."""
        b, model = self.b, self.model
        below = x
        for i, layer in enumerate(model.layers[:layers]):
            with b.scope(f"{self.tag}/t0/{layer.name}"):
                below = forward(b, layer_input(b, below, model, i), self.params, model, i)[1]
            self.first.append(below)
            self.states.append(below if copies == 1 else b.concat([below] * copies, axis=0))

    def step(self):
        """One synchronous damped iteration. Returns per layer (bottom-up input, top-down input, z)."""
        b, model = self.b, self.model
        self.t += 1
        names = [layer.name for layer in model.layers]
        normed = []
        for name, h in zip(names, self.states):
            with b.scope(f"{self.tag}/t{self.t}/{name}"):
                normed.append(normalize(b, h, model))
        new_states, parts = [], []
        for i, name in enumerate(names):
            below = self.pixels if i == 0 else normed[i - 1]
            above = self.label if i == len(names) - 1 else normed[i + 1]
            with b.scope(f"{self.tag}/t{self.t}/{name}"):
                z = b.add(forward(b, below, self.params, model, i)[0], top_down(b, model, self.params, i, above))
                new_states.append(damped(b, model, self.states[i], z))
            parts.append((below, above, z))
        self.states = new_states
        return parts


def _label_rows(b: Builder, model: Model, onehot: Value) -> Value:
    return normalize(b, onehot, model)


def _every_label(b: Builder, model: Model, batch: int) -> Value:
    """[N*B, N] one-of-N rows: block c holds label c."""
    classes = model.input.label.classes
    return b.constant(np.repeat(np.eye(classes, dtype=np.float32), batch, axis=0))


def _label_pass(b: Builder, model: Model, params, x: Value, batch: int, iterations: int, tag: str):
    """Every label on top of every image: yields (t, summed goodness [N*B]) for t = 1..iterations."""
    classes = model.input.label.classes
    with b.scope(tag):
        pixels = b.concat([layer_input(b, x, model, 0)] * classes, axis=0)
        label = _label_rows(b, model, _every_label(b, model, batch))
    net = Unrolled(b, model, params, pixels, label, tag)
    net.bottom_up(x, copies=classes)
    for _ in range(iterations):
        net.step()
        with b.scope(f"{tag}/t{net.t}/goodness"):
            total = None
            for i in scored_layers(model):
                g = goodness(b, net.states[i], model)
                total = g if total is None else b.add(total, g)
        yield net.t, total


def _per_label(b: Builder, model: Model, total: Value, batch: int) -> Value:
    return b.transpose(b.reshape(total, [model.input.label.classes, batch]), [1, 0])


def _infer_goodness(b: Builder, model: Model, batch: int) -> None:
    params = param_inputs(b, model)
    x = b.input("x", (batch, model.input.size))
    lo, hi = model.recurrent.readout_iterations
    score = None
    for t, total in _label_pass(b, model, params, x, batch, hi, "labelled"):
        if t >= lo:
            score = total if score is None else b.add(score, total)
    scores = _per_label(b, model, b.mul(score, 1.0 / (hi - lo + 1)), batch)
    b.output("scores", scores)
    b.output("prediction", b.argmax(scores, 1))


def _softmax_features(b: Builder, model: Model, net: Unrolled) -> Value:
    """The one-pass readout's input: normalized bottom-up states of ``readout.softmax_layers``."""
    features = []
    for i in sorted(model.layer_index(n) for n in model.readout.softmax_layers):
        with b.scope(f"{net.tag}/t0/{model.layers[i].name}/feature"):
            features.append(normalize(b, net.first[i], model))
    return features[0] if len(features) == 1 else b.concat(features, axis=1)


def _infer_softmax(b: Builder, model: Model, batch: int) -> None:
    params = param_inputs(b, model)
    x = b.input("x", (batch, model.input.size))
    net = Unrolled(b, model, params, None, None, "one_pass")  # no iterations: no pixels or label rows
    net.bottom_up(x, layers=1 + max(model.layer_index(n) for n in model.readout.softmax_layers))
    probs = softmax(b, softmax_logits(b, _softmax_features(b, model, net), params))
    b.output("probs", probs)
    b.output("prediction", b.argmax(probs, 1))


def _states(b: Builder, model: Model, batch: int) -> None:
    """Every layer's state at every iteration for images ``x`` with labels ``y`` (for tests and
    pictures): outputs ``state.{layer}.{t}``, t = 0..iterations."""
    params = param_inputs(b, model)
    x = b.input("x", (batch, model.input.size))
    y = b.input("y", (batch,), "int64")
    net = Unrolled(b, model, params, layer_input(b, x, model, 0),
                   _label_rows(b, model, b.one_hot(y, model.input.label.classes)), "states")
    net.bottom_up(x)
    for t in range(model.recurrent.iterations + 1):
        if t:
            net.step()
        for layer, h in zip(model.layers, net.states):
            b.output(f"state.{layer.name}.{t}", h)


def _single_pass_probs(b: Builder, model: Model, params, x: Value, batch: int) -> Value:
    """The class probabilities hard-label negatives are drawn from (see the module doc).

    After one iteration only the top hidden layer has seen the label: every layer below gets the
    same input whatever the label, so its goodness adds the same amount to each label's score and
    cancels in the softmax. So the layers below run once, and only the top layer once per label
    (a tenth of the work of running the whole net with every label)."""
    classes, top = model.input.label.classes, len(model.layers) - 1
    if top not in scored_layers(model):
        return b.constant(np.full((batch, classes), 1.0 / classes, np.float32))
    net = Unrolled(b, model, params, None, None, "single_pass")
    net.bottom_up(x)
    with b.scope(f"single_pass/t1/{model.layers[top].name}"):
        below = layer_input(b, x, model, 0) if top == 0 else normalize(b, net.first[top - 1], model)
        bottom_up = b.concat([forward(b, below, params, model, top)[0]] * classes, axis=0)
        label = _label_rows(b, model, _every_label(b, model, batch))
        z = b.add(bottom_up, top_down(b, model, params, top, label))
        previous = b.concat([net.first[top]] * classes, axis=0)
        h = damped(b, model, previous, z)
    with b.scope("single_pass"):
        return softmax(b, _per_label(b, model, goodness(b, h, model), batch))


def _negative_probs(b: Builder, model: Model, batch: int) -> None:
    """``probs``: the wrong-label probabilities of ``train_step`` alone (for parity's tie checks)."""
    params = param_inputs(b, model)
    x = b.input("x", (batch, model.input.size))
    b.output("probs", _single_pass_probs(b, model, params, x, batch))


def _train_step(b: Builder, model: Model, batch: int) -> None:
    params = param_inputs(b, model)
    state = state_inputs(b, model)
    x = b.input("x", (batch, model.input.size))
    labels = b.input("y", (batch,), "int64")
    u = b.input("u", (batch,))
    lr = b.input("lr", ())
    step = b.input("step", ()) if model.optimizer.kind == "adam" else None
    classes, recurrent = model.input.label.classes, model.recurrent
    metrics: dict[str, Value] = {}

    if model.negatives.kind == "hard_label":
        weights = _single_pass_probs(b, model, params, x, batch)
    else:
        weights = b.constant(np.zeros((batch, classes), np.float32))  # plus min_prob: uniform
    negative_labels = lbl.sample_wrong_labels(b, weights, labels, u, model.negatives.min_prob)
    metrics["negative_labels"] = negative_labels

    with b.scope("posneg"):
        pixels = layer_input(b, x, model, 0)
        onehot = b.concat([b.one_hot(labels, classes), b.one_hot(negative_labels, classes)], axis=0)
        net = Unrolled(b, model, params, b.concat([pixels, pixels], axis=0), _label_rows(b, model, onehot), "posneg")
    net.bottom_up(x, copies=2)

    grads: dict[str, Value] = {}
    sums: dict[str, Value] = {}
    if model.readout.softmax_layers:
        with b.scope("softmax"):
            features = _softmax_features(b, model, net)
            probs = softmax(b, softmax_logits(b, features, params))
            grads["softmax.weight"], grads["softmax.bias"], metrics["loss.softmax"] = softmax_gradient(
                b, features, probs, labels)

    def accumulate(key: str, value: Value) -> None:
        sums[key] = value if key not in sums else b.add(sums[key], value)

    for _ in range(recurrent.iterations):
        parts = net.step()
        for i, (below, above, z) in enumerate(parts):
            name = model.layers[i].name
            with b.scope(f"posneg/t{net.t}/{name}"):
                rule = local_gradient(b, below, z, net.states[i], model, i, batch)
                accumulate(f"{name}.weight", rule.weight)
                accumulate(f"{name}.top_down.weight", top_down_gradient(b, model, i, rule.dz, above))
                accumulate(f"{name}.bias", rule.bias)
                accumulate(f"loss.{name}", rule.loss)
                accumulate(f"goodness_pos.{name}", rule.goodness_pos)
                accumulate(f"goodness_neg.{name}", rule.goodness_neg)
    for key, total in sums.items():
        if key in params:
            # local_gradient differentiates w.r.t. relu(z); h_t carries (1 - damping) of it
            grads[key] = b.mul(total, 1.0 - recurrent.damping)
        else:
            metrics[key] = b.mul(total, 1.0 / recurrent.iterations)  # per-iteration means

    emit_updates(b, model, params, grads, state, {}, metrics, lr, step)
