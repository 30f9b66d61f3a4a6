"""A static image treated as a boring video (sec. 3.4, figure 3): pixels at the bottom, a one-of-N
label layer on top, dense hidden layers between, each receiving the normalized states of the
layer below and the layer above.

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

Readout. Each label in turn sits on top; the score is the goodness (summed over
``readout.goodness_layers``, all hidden layers if empty) averaged over iterations
``readout_iterations[0]..[1]`` inclusive; later iterations cannot change it, so inference unrolls
only that far.

Negatives (sec. 3.4: "a single forward pass through the net to get probabilities for all the
classes"). In this net a bottom-up pass never sees the label, so the single pass is: the
bottom-up pass, then one synchronous iteration with each label on top; the softmax over labels
of the summed goodness after that iteration gives the probabilities from which a wrong label is
drawn in proportion (``labels.sample_wrong_labels``).
"""

from __future__ import annotations

import numpy as np

from ..errors import FFCompileError
from ..program.builder import Builder
from ..program.ir import Value
from ..spec import Model
from . import labels as lbl
from .layer import goodness, layer_input, local_gradient, normalize
from .optimizers import emit_updates
from .readouts import softmax
from .state import param_specs, state_specs

PROGRAMS = ("train_step", "infer_goodness")
EXTRA_PROGRAMS = ("recurrent_states", "negative_probs")


def build(b: Builder, model: Model, name: str, batch: int) -> None:
    builders = {"train_step": _train_step, "infer_goodness": _infer_goodness, "recurrent_states": _states,
                "negative_probs": _negative_probs}
    if name not in builders:
        raise FFCompileError(f"model {model.name!r} is recurrent: its programs are "
                             f"{', '.join(PROGRAMS + EXTRA_PROGRAMS)}, not {name!r}")
    builders[name](b, model, batch)


def scored_layers(model: Model) -> list[int]:
    chosen = model.readout.goodness_layers
    return sorted(model.layer_index(n) for n in chosen) if chosen else list(range(len(model.layers)))


class Unrolled:
    """The network's states over the iterations for one set of rows. ``pixels``: the bottom layer
    as the first hidden layer sees it; ``label``: the top layer's normalized one-of-N rows."""

    def __init__(self, b: Builder, model: Model, params: dict[str, Value], pixels: Value, label: Value, tag: str):
        self.b, self.model, self.params, self.pixels, self.label, self.tag = b, model, params, pixels, label, tag
        self.states: list[Value] = []
        self.t = 0

    def bottom_up(self, x: Value, copies: int = 1) -> None:
        """Iteration 0 from the image rows ``x``; ``copies``: the states are tiled that many times
        (the pass does not depend on the label, so labelled copies share it)."""
        b, model = self.b, self.model
        below = x
        for i, layer in enumerate(model.layers):
            with b.scope(f"{self.tag}/t0/{layer.name}"):
                inp = layer_input(b, below, model, i)
                z = b.add(b.matmul(inp, self.params[f"{layer.name}.weight"], trans_b=True), self.params[f"{layer.name}.bias"])
                below = b.relu(z)
            self.states.append(below if copies == 1 else b.concat([below] * copies, axis=0))

    def step(self):
        """One synchronous damped iteration. Returns per layer (bottom-up input, top-down input, z)."""
        b, model, damping = self.b, self.model, self.model.recurrent.damping
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
                z = b.add(b.add(b.matmul(below, self.params[f"{name}.weight"], trans_b=True),
                                b.matmul(above, self.params[f"{name}.top_down.weight"], trans_b=True)),
                          self.params[f"{name}.bias"])
                new_states.append(b.add(b.mul(self.states[i], damping), b.mul(b.relu(z), 1.0 - damping)))
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
    params = {name: b.input(name, shape) for name, shape in param_specs(model).items()}
    x = b.input("x", (batch, model.input.size))
    lo, hi = model.recurrent.readout_iterations
    score = None
    for t, total in _label_pass(b, model, params, x, batch, hi, "labelled"):
        if t >= lo:
            score = total if score is None else b.add(score, total)
    scores = _per_label(b, model, b.mul(score, 1.0 / (hi - lo + 1)), batch)
    b.output("scores", scores)
    b.output("prediction", b.argmax(scores, 1))


def _states(b: Builder, model: Model, batch: int) -> None:
    """Every layer's state at every iteration for images ``x`` with labels ``y`` (for tests and
    pictures): outputs ``state.{layer}.{t}``, t = 0..iterations."""
    params = {name: b.input(name, shape) for name, shape in param_specs(model).items()}
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
    """The class probabilities hard-label negatives are drawn from (see the module doc)."""
    _t, total = next(_label_pass(b, model, params, x, batch, 1, "single_pass"))
    with b.scope("single_pass"):
        return softmax(b, _per_label(b, model, total, batch))


def _negative_probs(b: Builder, model: Model, batch: int) -> None:
    """``probs``: the wrong-label probabilities of ``train_step`` alone (for parity's tie checks)."""
    params = {name: b.input(name, shape) for name, shape in param_specs(model).items()}
    x = b.input("x", (batch, model.input.size))
    b.output("probs", _single_pass_probs(b, model, params, x, batch))


def _train_step(b: Builder, model: Model, batch: int) -> None:
    params = {name: b.input(name, shape) for name, shape in param_specs(model).items()}
    state = {name: b.input(name, shape) for name, shape in state_specs(model).items()}
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

    def accumulate(key: str, value: Value) -> None:
        sums[key] = value if key not in sums else b.add(sums[key], value)

    for _ in range(recurrent.iterations):
        parts = net.step()
        for i, (below, above, z) in enumerate(parts):
            name = model.layers[i].name
            with b.scope(f"posneg/t{net.t}/{name}"):
                rule = local_gradient(b, b.concat([below, above], axis=1), z, net.states[i], model, i, batch)
                accumulate(f"{name}.weight", b.slice(rule.weight, 1, 0, below.shape[1]))
                accumulate(f"{name}.top_down.weight", b.slice(rule.weight, 1, below.shape[1], rule.weight.shape[1]))
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
