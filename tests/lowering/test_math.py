"""The FF math of the lowering against hand-computed values: label embedding, length
normalization, goodness and the logistic loss (eq. 1), and negative-label sampling."""

import math
from pathlib import Path

import numpy as np
import pytest

from ffcompile.reference.interpreter import TorchProgram
from ffcompile.lowering import labels as lbl
from ffcompile.lowering import build_program
from ffcompile.lowering.layer import LabelledRows, SharedImage, local_gradient, normalize
from ffcompile.core.builder import Builder
from ffcompile.core.spec import DenseLayer, Goodness, InputSpec, Model, Normalization, Readout, load_model

SMALL = Model(name="m", input=InputSpec(size=16, image_shape=(4, 4)), layers=(DenseLayer("h1", 3),),
              goodness=Goodness(threshold_per_unit=1.0), readout=Readout(softmax_layers=("h1",)))


def run(build, feeds):
    b = Builder("t")
    build(b)
    return TorchProgram(b.build()).run_numpy(feeds)


def test_label_embedding_replaces_first_pixels():
    x = np.random.default_rng(0).random((3, 16), dtype=np.float32)
    y = np.array([0, 9, 4])
    model = Model(name="m", input=InputSpec(size=16, image_shape=(4, 4)), layers=SMALL.layers)

    def build(b):
        xv, yv = b.input("x", (3, 16)), b.input("y", (3,), "int64")
        b.output("pos", LabelledRows(SharedImage(xv, 10, 1), [b.one_hot(yv, 10)]).whole(b))
        b.output("neutral", LabelledRows(SharedImage(xv, 10, 1), [lbl.neutral_label(b, xv, model)]).whole(b))

    out = run(build, {"x": x, "y": y})
    assert np.array_equal(out["pos"][:, :10], np.eye(10, dtype=np.float32)[y])
    assert np.array_equal(out["pos"][:, 10:], x[:, 10:])
    assert np.array_equal(out["neutral"][:, :10], np.full((3, 10), 0.1, np.float32))
    assert np.array_equal(out["neutral"][:, 10:], x[:, 10:])


@pytest.mark.parametrize("kind,check", [
    ("rms", lambda o: np.mean(o ** 2, axis=1)),
    ("l2", lambda o: np.sum(o ** 2, axis=1)),
    ("l1", lambda o: np.sum(np.abs(o), axis=1)),
])
def test_length_normalization_keeps_direction_and_mean(kind, check):
    x = np.array([[3.0, 4.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]], np.float32)
    model = Model(name="m", layers=SMALL.layers, normalization=Normalization(kind=kind, eps=1e-12))

    def build(b):
        b.output("n", normalize(b, b.input("x", (2, 4)), model))

    n = run(build, {"x": x})["n"]
    np.testing.assert_allclose(check(n), [1.0, 1.0], rtol=1e-6)
    # no mean subtraction (footnote 5): a constant row stays constant and positive
    np.testing.assert_allclose(n[1], [n[1, 0]] * 4)
    assert n[1, 0] > 0
    # same orientation: n is a positive multiple of x
    ratio = n[0][x[0] != 0] / x[0][x[0] != 0]
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-6)


@pytest.mark.parametrize("kind,want_loss,want_g", [
    # theta = 3 units x 1.0. pos y = [1, 2, 0]: ssq 5; neg y = [0, 0, 1]: ssq 1.
    ("ssq", math.log1p(math.exp(-2.0)), (5.0, 1.0)),      # logits +2 (pos), -2 (neg): both right
    ("neg_ssq", math.log1p(math.exp(2.0)), (-5.0, -1.0)),  # min ssq: both wrong by the same margin
])
def test_goodness_and_loss_by_hand(kind, want_loss, want_g):
    model = Model(name="m", input=SMALL.input, layers=SMALL.layers, goodness=Goodness(kind=kind, threshold_per_unit=1.0))
    y = np.array([[1.0, 2.0, 0.0], [0.0, 0.0, 1.0]], np.float32)
    x = np.array([[1.0, 0.0], [0.0, 2.0]], np.float32)

    def build(b):
        xv, zv = b.input("x", (2, 2)), b.input("z", (2, 3))
        rule = local_gradient(b, xv, zv, b.relu(zv), model, 0, batch=1)
        for name in ("loss", "goodness_pos", "goodness_neg", "weight", "bias"):
            b.output(name, getattr(rule, name))

    out = run(build, {"x": x, "z": y})
    assert out["loss"] == pytest.approx(want_loss, rel=1e-6)
    assert (float(out["goodness_pos"]), float(out["goodness_neg"])) == pytest.approx(want_g)
    # eq. (3) generalised: dloss/dW[j] = sum over rows of (sigmoid(l) - t)/2B * sign * 2 y_j * x
    sign = -1.0 if kind == "neg_ssq" else 1.0
    sig = lambda v: 1 / (1 + math.exp(-v))
    d_pos = (sig(sign * 2.0) - 1) / 2 * sign
    d_neg = (sig(sign * -2.0) - 0) / 2 * sign
    want_dw = np.outer(d_pos * 2 * y[0], x[0]) + np.outer(d_neg * 2 * y[1], x[1])
    np.testing.assert_allclose(out["weight"], want_dw, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out["bias"], d_pos * 2 * y[0] + d_neg * 2 * y[1], rtol=1e-6, atol=1e-7)



@pytest.mark.parametrize("kind", ["ssq", "neg_ssq"])
def test_rule_for_relu_activities_drops_the_step_with_the_same_bits(kind):
    """With y = relu(z), the rule computes dz as (2 dlogit) y instead of dlogit (2 y) step(z):
    the same bits, zeros and signed zeros included, in fewer full-size passes."""
    model = Model(name="m", input=SMALL.input, layers=(DenseLayer("h1", 64),), goodness=Goodness(kind=kind, threshold_per_unit=1.0))
    rng = np.random.default_rng(3)
    z = rng.normal(size=(2 * 8, 64)).astype(np.float32)
    z[0, :4] = [0.0, -0.0, 1e-40, -1e-40]
    x = rng.normal(size=(2 * 8, 16)).astype(np.float32)

    def build(y_is_relu):
        def build_rule(b):
            xv, zv = b.input("x", x.shape), b.input("z", z.shape)
            rule = local_gradient(b, xv, zv, b.relu(zv), model, 0, batch=8, y_is_relu=y_is_relu)
            b.output("dz", rule.dz)
            b.output("weight", rule.weight)
            b.output("bias", rule.bias)
        return build_rule

    general, short = run(build(False), {"x": x, "z": z}), run(build(True), {"x": x, "z": z})
    for name in ("dz", "weight", "bias"):
        np.testing.assert_array_equal(np.signbit(short[name]), np.signbit(general[name]), err_msg=name)
        np.testing.assert_array_equal(short[name], general[name], err_msg=name)


def sample(probs, labels, u, min_prob=1e-6):
    n, c = probs.shape

    def build(b):
        b.output("k", lbl.sample_wrong_labels(b, b.input("p", (n, c)), b.input("y", (n,), "int64"), b.input("u", (n,)), min_prob))

    return run(build, {"p": probs, "y": labels, "u": u})["k"]


def test_hard_negatives_never_true_label_and_follow_the_distribution():
    rng = np.random.default_rng(0)
    n = 200_000
    p = np.array([0.02, 0.5, 0.03, 0.05, 0.1, 0.05, 0.05, 0.1, 0.05, 0.05], np.float32)
    labels = np.full(n, 1)  # the most probable class is the true one: it must never be drawn
    k = sample(np.tile(p, (n, 1)), labels, rng.random(n, dtype=np.float32))
    assert not np.any(k == labels)
    want = (p + 1e-6) * (np.arange(10) != 1)
    want /= want.sum()
    freq = np.bincount(k, minlength=10) / n
    # binomial standard error is at most 0.0011 here; 5 sigma
    np.testing.assert_allclose(freq, want, atol=5 * math.sqrt(0.25 / n))


@pytest.mark.parametrize("u", [0.0, 1e-9, 0.5, np.nextafter(np.float32(1), np.float32(0))])
def test_sampling_extremes_stay_valid(u):
    for true in range(10):
        p = np.zeros((1, 10), np.float32)
        p[0, true] = 1.0  # confident and right: every wrong class has only the floor
        k = int(sample(p, np.array([true]), np.array([u], np.float32))[0])
        assert 0 <= k < 10 and k != true


def test_random_negatives_are_uniform_over_wrong_labels():
    rng = np.random.default_rng(1)
    n = 100_000
    labels = rng.integers(0, 10, n)
    k = sample(np.zeros((n, 10), np.float32), labels, rng.random(n, dtype=np.float32))
    assert not np.any(k == labels)
    offsets = (k - labels) % 10
    np.testing.assert_allclose(np.bincount(offsets, minlength=10)[1:] / n, 1 / 9, atol=5 * math.sqrt(0.25 / n))


def _ort_and_torch(build, feeds):
    """The same one-off program through onnxruntime and the torch reference."""
    from ffcompile.compiler.onnx_emit import to_onnx
    from ffcompile.runtime.ort import OrtProgram
    b = Builder("t")
    build(b)
    program = b.build()
    return OrtProgram(to_onnx(program).SerializeToString(), threads=1).run(feeds), TorchProgram(program).run_numpy(feeds)


def test_sigmoid_keeps_relative_precision_when_saturated():
    """The sigmoid primitive is within 1e-6 (relative) of float64 on both backends out to |x| = 80,
    where onnxruntime's own Sigmoid is 0 (a saturated FF logit's gradient is there)."""
    x = np.concatenate([-np.geomspace(80, 1e-3, 40), [0.0], np.geomspace(1e-3, 80, 40)]).astype(np.float32)
    want = 1 / (1 + np.exp(-x.astype(np.float64)))
    for got in _ort_and_torch(lambda b: b.output("y", b.sigmoid(b.input("x", x.shape))), {"x": x}):
        np.testing.assert_allclose(got["y"], want, rtol=1e-6, atol=0)


def test_softmax_gradient_of_a_confident_true_class_is_precise():
    """p - 1 for a true class with p ~ 1 - 1e-9: computed from the other classes, not as fp32
    noise (which Adam would turn into a full step)."""
    from ffcompile.lowering.readouts import softmax, softmax_gradient
    logits = np.array([[30.0, 9.0, 10.0], [0.0, 1.0, -1.0]], np.float32)
    features = np.eye(2, dtype=np.float32)
    labels = np.array([0, 2])

    def build(b):
        probs = softmax(b, b.input("logits", (2, 3)))
        dw, db, _ = softmax_gradient(b, b.input("features", (2, 2)), probs, b.input("labels", (2,), "int64"))
        b.output("dw", dw)

    z = logits.astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    want = ((p - np.eye(3)[labels]) / 2).T  # dW = dlogits^T features, features the identity
    for got in _ort_and_torch(build, {"logits": logits, "features": features, "labels": labels}):
        np.testing.assert_allclose(got["dw"], want, rtol=1e-5, atol=0)


def _products_over_the_input(program, width: int) -> list[tuple[int, int]]:
    """(rows, units) of each product whose sum runs over ``width`` inputs (a first layer's
    forward: x W^T)."""
    shapes = {v.name: v.shape for v in program.inputs} | {n.output.name: n.output.shape for n in program.nodes}
    found = []
    for node in program.nodes:
        if node.op == "matmul" and not node.attrs.get("trans_a"):
            if shapes[node.inputs[0]][1] == width:
                found.append(node.output.shape)
    return found


@pytest.mark.parametrize("name,passes", [("train_step", 3), ("infer_goodness", 10), ("infer_softmax", 0)])
def test_labelled_passes_multiply_the_image_by_the_first_layer_once(name, passes):
    """The neutral, positive and negative rows (train_step), or the ten labelled copies
    (infer_goodness), differ only in the label's inputs: the first layer multiplies the batch's
    rows by its weights once, the label blocks by its first 10 columns. A single pass
    (infer_softmax's neutral one) multiplies its whole rows, the label's columns with the rest."""
    model = load_model(str(Path(__file__).parents[2] / "models" / "mnist-small.toml"))
    batch, units = 8, model.layers[0].size
    program = build_program(model, name, batch)
    assert _products_over_the_input(program, model.input.size) == [(batch, units)]
    label_rows = [rows for rows, cols in _products_over_the_input(program, model.input.label.classes) if cols == units]
    assert sum(label_rows) == passes * batch



def test_labelled_blocks_add_the_shared_product_by_broadcasting():
    """The positive and negative blocks add x W^T by broadcasting over the blocks: no copies of it
    side by side, which onnxruntime would hold as one more [2B, units] tensor (at batch 1000 of
    Hinton's 4 x 2000 net, 16 MB: its step's working memory would exceed half of backprop's)."""
    model = load_model(str(Path(__file__).parents[2] / "models" / "mnist-small.toml"))
    program = build_program(model, "train_step", 8)
    assert not [n for n in program.nodes if n.op == "concat" and len(n.inputs) > 1 and len(set(n.inputs)) == 1
                and n.output.shape[1] == model.layers[0].size]
