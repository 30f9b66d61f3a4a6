"""One FF layer: length normalization, forward, goodness, the logistic local rule (eq. 1) and its
analytic gradient, peer normalization (footnote 9)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..core.builder import Builder
from ..core.errors import FFCompileError
from ..core.program import Value
from ..core.spec import DenseLayer, LocalLayer, Model
from . import local


def normalize(b: Builder, x: Value, model: Model) -> Value:
    """Length normalization without mean subtraction (footnote 5), row-wise."""
    with b.scope("normalize"):
        return b.div(x, _length(b, _row_total(b, x, model), x.shape[1], model))


def _row_total(b: Builder, x: Value, model: Model) -> Value:
    """Per row [rows, 1]: what its length is made from, the sum of |x| (l1) or of x^2. Row parts'
    totals add up to the whole row's."""
    if model.normalization.kind == "l1":
        return b.reduce_sum(b.abs(x), [1], keepdims=True)
    return b.reduce_sum(b.mul(x, x), [1], keepdims=True)


def _length(b: Builder, total: Value, width: int, model: Model) -> Value:
    """The length of rows of ``width`` inputs from their ``_row_total``."""
    norm = model.normalization
    if norm.kind == "l1":
        return b.add(total, norm.eps)
    if norm.kind == "rms":
        total = b.mul(total, 1.0 / width)
    return b.sqrt(b.add(total, norm.eps))


class SharedImage:
    """Input rows x whose first N inputs each pass replaces by a label (sec. 3.3), the rest (the
    image) being the same for all. Passes that embed different labels in the same images then
    multiply x by a dense first layer's weights once. ``blocks``: how many label blocks in all
    read x; with one, nothing is shared and the rows are built whole (one product over them, as
    an int8 program quantizes it: a weight that a label product also read would be dequantized
    to float32 on every call)."""

    def __init__(self, x: Value, classes: int, blocks: int):
        self.x = x
        self.classes = classes
        self.blocks = blocks
        self._made: dict = {}

    def once(self, key, make):
        if key not in self._made:
            self._made[key] = make()
        return self._made[key]

    def image(self, b: Builder) -> Value:
        return b.slice(self.x, 1, self.classes, self.x.shape[1])


@dataclass
class LabelledRows:
    """Row blocks [labels[k] | image], k = 0, 1, ...: the shared image with one label per block."""
    shared: SharedImage
    labels: list[Value] = field(default_factory=list)

    def whole(self, b: Builder) -> Value:
        blocks = [b.concat([label, self.shared.image(b)], axis=1) for label in self.labels]
        return blocks[0] if len(blocks) == 1 else b.concat(blocks, axis=0)


@dataclass
class LabelledInput:
    """A dense first layer's input for LabelledRows: the rows divided by their ``lengths``
    [rows, 1] (None: the input is not normalized). Built whole only where a weight gradient or
    a row sum reads it."""
    rows: LabelledRows
    lengths: Value | None
    _whole: Value | None = None

    def whole(self, b: Builder) -> Value:
        if self._whole is None:
            rows = self.rows.whole(b)
            self._whole = rows if self.lengths is None else b.div(rows, self.lengths)
        return self._whole


def as_value(b: Builder, x: Value | LabelledInput) -> Value:
    """A layer input as one tensor [rows, inputs]."""
    return x.whole(b) if isinstance(x, LabelledInput) else x


def _labelled_forward(b: Builder, rows: LabelledRows, params: dict[str, Value], model: Model,
                      i: int) -> tuple[LabelledInput, Value]:
    """A dense first layer's input and pre-activation z for labelled rows: z = (x W^T + (label -
    x's first N) W_label^T) / length + bias, x W^T made once for every pass. (x itself rather than
    its image columns: a slice of x would be one more tensor the size of the batch.)"""
    layer = model.layers[i]
    weight, bias = params[f"{layer.name}.weight"], params[f"{layer.name}.bias"]
    shared, n = rows.shared, rows.shared.classes
    x = shared.x
    product = shared.once(("product", weight.name), lambda: b.matmul(x, weight, trans_b=True))
    blocks = len(rows.labels)
    replaced = b.slice(x, 1, 0, n)
    changes = [b.sub(label, replaced) for label in rows.labels]
    labelled = b.matmul(changes[0] if blocks == 1 else b.concat(changes, axis=0), b.slice(weight, 1, 0, n),
                        trans_b=True)
    if blocks == 1:
        product = b.add(product, labelled)
    else:  # each block plus the shared product, broadcast (no copies of it side by side); the
        # rows as -1: an exported inference program takes any batch
        units = product.shape[1]
        product = b.reshape(b.add(b.reshape(labelled, [blocks, -1, units]), product), [-1, units])
    lengths = None
    if model.input.normalize:
        labels = rows.labels[0] if blocks == 1 else b.concat(rows.labels, axis=0)
        image_total = shared.once(("total",), lambda: _row_total(b, shared.image(b), model))
        total = image_total if blocks == 1 else b.concat([image_total] * blocks, axis=0)
        lengths = _length(b, b.add(total, _row_total(b, labels, model)), x.shape[1], model)
        product = b.div(product, lengths)
    return LabelledInput(rows, lengths), b.add(product, bias)


def layer_input(b: Builder, below: Value, model: Model, i: int) -> Value:
    """What layer i sees: the raw (optionally normalized) input for i = 0, else the normalized
    activities of layer i-1 — only their orientation passes upward (sec. 2.1)."""
    if i == 0 and not model.input.normalize:
        return below
    return normalize(b, below, model)


def forward(b: Builder, x: Value, params: dict[str, Value], model: Model, i: int) -> tuple[Value, Value]:
    """Pre-activation z and ReLU activity y of layer i for input rows x."""
    layer = model.layers[i]
    weight, bias = params[f"{layer.name}.weight"], params[f"{layer.name}.bias"]
    if isinstance(layer, LocalLayer):
        z = local.forward(b, x, weight, bias, model, i)
    elif isinstance(layer, DenseLayer):
        z = b.add(b.matmul(x, weight, trans_b=True), bias)
    else:
        raise FFCompileError(f"layer {layer.name!r}: the lowering does not support {layer.kind!r} layers yet")
    return z, b.relu(z)


def run_layers(b: Builder, rows: Value | LabelledRows, params: dict[str, Value], model: Model, tag: str,
               layers: range | None = None):
    """Forward pass through ``layers`` (default: every layer), ``rows`` being what the first of
    them reads (the input, or the activities of the layer below it); yields (i, layer input, z, y)
    per layer. Labelled rows whose image several label blocks share go into a dense first layer
    as a ``LabelledInput``; otherwise they are built whole."""
    below = rows
    for i in range(len(model.layers)) if layers is None else layers:
        layer = model.layers[i]
        with b.scope(f"{tag}/{layer.name}"):
            if isinstance(below, LabelledRows) and (below.shared.blocks == 1 or not isinstance(layer, DenseLayer)):
                below = below.whole(b)
            if isinstance(below, LabelledRows):
                x, z = _labelled_forward(b, below, params, model, i)
                y = b.relu(z)
            else:
                x = layer_input(b, below, model, i)
                z, y = forward(b, x, params, model, i)
        yield i, x, z, y
        below = y


def softplus(b: Builder, x: Value) -> Value:
    """log(1 + exp(x)) written so it never overflows: relu(x) + log(1 + exp(-|x|)). Goodness far
    from the threshold gives logits in the hundreds, where a naive exp overflows fp32."""
    return b.add(b.relu(x), b.log(b.add(b.exp(b.neg(b.abs(x))), 1.0)))


def goodness_sign(model: Model) -> float:
    """+1: positive data should have high measure (ssq, sum); -1: low ("min ssq", sec. 3.5)."""
    return -1.0 if model.goodness.kind == "neg_ssq" else 1.0


def measure(b: Builder, y: Value, model: Model) -> Value:
    """Per-row sum of squares (ssq, neg_ssq) or sum of activities (sum) — before normalization."""
    if model.goodness.kind == "sum":
        return b.reduce_sum(y, [1])
    return b.reduce_sum(b.mul(y, y), [1])


def goodness(b: Builder, y: Value, model: Model) -> Value:
    """The goodness as the paper defines it: the measure, or minus it for min-ssq."""
    m = measure(b, y, model)
    return b.neg(m) if goodness_sign(model) < 0 else m


def logit(b: Builder, m: Value, model: Model, i: int) -> Value:
    """log-odds that a row is positive: sign * (measure - theta), eq. (1)."""
    shifted = b.sub(m, model.threshold(i))
    return b.neg(shifted) if goodness_sign(model) < 0 else shifted


@dataclass
class LocalGradient:
    weight: Value
    bias: Value
    loss: Value
    goodness_pos: Value | None
    goodness_neg: Value | None
    dz: Value | None = None  # dloss/dz [rows, out], for inputs the rule does not know (recurrent top-down)


def local_gradient(b: Builder, x: Value, z: Value, y: Value, model: Model, i: int, batch: int,
                   phase: str = "both", norm: int | None = None, y_is_relu: bool = False) -> LocalGradient:
    """Analytic gradient of the layer's own loss for rows [positives; negatives] (B each).

    loss = mean over the 2B rows of softplus(-logit) for positives and softplus(logit) for
    negatives; dloss/dlogit = (sigmoid(logit) - target) / 2B, then the chain rule down to the
    weights: dlogit/dmeasure = sign, dmeasure/dy = 2y (or 1), dy/dz = step(z), dz/dW = x (eq. 3).
    ``phase`` "positive" / "negative": the rows are only the B positives / negatives and the
    result is that half of the sum (same 1/2B scale), so the two halves add up to "both".
    ``norm``: the B of the scale when the rows are one shard of a larger batch (default: ``batch``),
    so that the shards' results add up to the whole batch's. ``y_is_relu``: y is relu(z) (not,
    say, a recurrent state mixing it with older activity), which lets the rule skip step(z).
    """
    targets = {"both": [1.0] * batch + [0.0] * batch, "positive": [1.0] * batch, "negative": [0.0] * batch}[phase]
    rows = len(targets)
    n = norm or batch
    with b.scope("local_rule"):
        m = measure(b, y, model)
        lg = logit(b, m, model, i)
        # With s = 1 - 2 * target, the row's loss is softplus(s * logit) and
        # sigmoid(logit) - target = s * sigmoid(s * logit): the latter never subtracts from 1.
        s = b.constant([1.0 - 2.0 * t for t in targets])
        signed = b.mul(lg, s)
        dlogit = b.mul(b.mul(b.sigmoid(signed), s), goodness_sign(model) / (2 * n))
        if model.goodness.kind == "sum":  # dmeasure/dy = 1
            dz = b.mul(b.reshape(dlogit, [rows, 1]), b.step(z))
        elif y_is_relu:
            # 2 y step(z) = 2 y where y = relu(z), and (2 dlogit) y rounds as dlogit (2 y) does:
            # the same bits as the general form, with two fewer full-size passes.
            dz = b.mul(b.reshape(b.mul(dlogit, 2.0), [rows, 1]), y)
        else:
            dz = b.mul(b.mul(b.reshape(dlogit, [rows, 1]), b.mul(y, 2.0)), b.step(z))
        per_row = softplus(b, signed)
        loss = b.mul(b.reduce_sum(per_row, [0]), 1.0 / (2 * n))
        x = as_value(b, x)
        if local.is_local(model, i):
            dw = local.weight_gradient(b, dz, x, model, i)
        else:
            dw = b.matmul(dz, x, trans_a=True)
        db = b.reduce_sum(dz, [0])
        sign = goodness_sign(model)
        g = b.mul(m, sign) if sign < 0 else m
        g_pos = g_neg = None
        if phase == "both":
            g_pos = b.mul(b.reduce_sum(b.slice(g, 0, 0, batch), [0]), 1.0 / n)
            g_neg = b.mul(b.reduce_sum(b.slice(g, 0, batch, 2 * batch), [0]), 1.0 / n)
        elif phase == "positive":
            g_pos = b.mul(b.reduce_sum(g, [0]), 1.0 / n)
        else:
            g_neg = b.mul(b.reduce_sum(g, [0]), 1.0 / n)
    return LocalGradient(dw, db, loss, g_pos, g_neg, dz)


def peer_normalization(b: Builder, x_sum: Value, y_sum: Value, old_mean: Value, model: Model, i: int, batch: int):
    """Footnote 9, from the positive rows' sums: ``x_sum`` [1, fan in] of the layer's inputs,
    ``y_sum`` [units] of its activities, over a batch of ``batch`` rows.
    m = momentum * m_old + (1 - momentum) * mean_batch(y_pos); loss = weight *
    mean_j (m_j - mean(m))^2. Its derivative reaches z as if the ReLU passed it everywhere (the
    "pretend" derivative), so dead units (m_j below the layer mean) get their weights increased.
    Every positive row gets the same dloss/dz, so dW needs only the sum of the rows' inputs.
    Returns (new running mean, dW, db, loss)."""
    peer = model.regularizers.peer_norm
    units = y_sum.shape[0]
    with b.scope("peer_norm"):
        new_mean = b.add(b.mul(old_mean, peer.momentum), b.mul(y_sum, (1.0 - peer.momentum) / batch))
        deviation = b.sub(new_mean, b.reduce_mean(new_mean, [0], keepdims=True))
        loss = b.mul(b.reduce_mean(b.mul(deviation, deviation), [0]), peer.weight)
        # dloss/dz for every positive row: "loss" differentiates the loss through the running mean,
        # weight * 2 (m_j - mean m) / units * (1 - momentum) / batch; "direct" pulls by weight * (m_j - mean m) / batch
        scale = peer.weight / batch if peer.form == "direct" else peer.weight * 2.0 / units * (1.0 - peer.momentum) / batch
        dz_row = b.mul(deviation, scale)
        if local.is_local(model, i):
            dw = local.weight_gradient(b, b.reshape(dz_row, [1, units]), x_sum, model, i)
        else:
            dw = b.matmul(b.reshape(dz_row, [units, 1]), x_sum)
        db = b.mul(dz_row, float(batch))
    return new_mean, dw, db, loss
