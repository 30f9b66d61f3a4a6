"""Label embedding (sec. 3.3) and negative labels: one-of-N in the first N inputs, the neutral
label, and wrong labels drawn with an explicit uniform random input."""

from __future__ import annotations

import numpy as np

from ..core.builder import Builder
from ..core.program import Value
from ..core.spec import Model


def constant_label(b: Builder, x: Value, row, model: Model) -> Value:
    """The same label ``row`` [N] for every row of x [rows, N], made from x's own first N inputs
    (0 * x + row): no batch-sized constant, so the program's ONNX form takes any batch."""
    first = b.slice(x, 1, 0, model.input.label.classes)
    return b.add(b.mul(first, 0.0), b.constant(np.asarray([row], np.float32)))


def neutral_label(b: Builder, x: Value, model: Model) -> Value:
    label = model.input.label
    return constant_label(b, x, [label.neutral] * label.classes, model)


def sample_wrong_labels(b: Builder, weights: Value, labels: Value, u: Value, min_prob: float) -> Value:
    """Draw one wrong label per row with probability proportional to ``weights`` (floored at
    ``min_prob`` so the draw is always defined) among the classes other than ``labels``, by
    inverse CDF with the uniform draws ``u`` in [0, 1).

    The true label's slot gets weight 0, so its cumulative value equals its predecessor's and
    ``c[j] < u <= c[j]`` can never select it. Dividing by the last cumulative value (not a
    separate sum) makes that value exactly 1, so u < 1 always lands in range.
    """
    classes = weights.shape[1]
    with b.scope("wrong_label"):
        wrong = b.sub(1.0, b.one_hot(labels, classes))
        q = b.mul(b.add(weights, min_prob), wrong)
        cdf = b.cumsum(q, axis=1)
        cdf = b.div(cdf, b.slice(cdf, 1, classes - 1, classes))
        u = b.maximum(b.reshape(u, [u.shape[0], 1]), 1e-7)  # u = 0 would select class 0 even if true
        below = b.cast(b.less(cdf, u), "float32")
        return b.cast(b.reduce_sum(below, [1]), "int64")
