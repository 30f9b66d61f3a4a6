"""Hybrid negative images for unsupervised FF (sec. 3.2, figure 1): the blur exactly as specified,
masks with large balanced regions, negatives that mix two digits of different classes, and the
unsupervised programs' readouts."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from ffcompile.reference.interpreter import TorchProgram
from ffcompile.data import load_mnist
from ffcompile.core.errors import FFCompileError
from ffcompile.lowering import build_program, init_state
from ffcompile.lowering.hybrid import blurred_bits
from ffcompile.loop.epochs import different_label_partners, epoch_plan
from ffcompile.core.builder import Builder
from ffcompile.core.spec import InputSpec, load_model

REPO = Path(__file__).parents[2]
UNSUPERVISED = load_model(REPO / "models" / "mnist-unsupervised.toml")


def with_passes(passes: int, model=UNSUPERVISED):
    return dataclasses.replace(model, negatives=dataclasses.replace(model.negatives, blur_passes=passes))


def blur(bits: np.ndarray, model) -> np.ndarray:
    b = Builder("blur")
    b.output("blurred", blurred_bits(b, b.input("bits", bits.shape), model))
    return TorchProgram(b.build()).run_numpy({"bits": bits})["blurred"]


def masks(bits: np.ndarray, model=UNSUPERVISED) -> np.ndarray:
    program = TorchProgram(build_program(model, "hybrid_negatives", len(bits)))
    zeros = np.zeros_like(bits)
    return program.run_numpy({"x": zeros, "x_other": zeros, "mask_bits": bits})["mask"]


def test_one_blur_pass_by_hand():
    """[1/4, 1/2, 1/4] along x, then along y; at the edge the edge pixel stands in for its missing
    neighbour, so each 1 keeps its total weight of 1."""
    model = with_passes(1, dataclasses.replace(UNSUPERVISED, input=InputSpec(size=36, image_shape=(6, 6))))
    bits = np.zeros((2, 6, 6), np.float32)
    bits[0, 2, 3] = 1  # inside
    bits[1, 0, 0] = 1  # corner
    out = blur(bits.reshape(2, 36), model).reshape(2, 6, 6)
    inside = np.zeros((6, 6))
    inside[1:4, 2:5] = np.outer([0.25, 0.5, 0.25], [0.25, 0.5, 0.25])
    corner = np.zeros((6, 6))
    corner[:2, :2] = np.outer([0.75, 0.25], [0.75, 0.25])
    np.testing.assert_array_equal(out[0], inside)
    np.testing.assert_array_equal(out[1], corner)
    assert out.reshape(2, -1).sum(1).tolist() == [1.0, 1.0]


def test_six_passes_equal_the_filter_written_out_and_are_exact_in_fp32():
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2, (4, 28, 28)).astype(np.float64)
    want = bits.copy()
    for _ in range(6):
        for axis in (2, 1):
            padded = np.pad(want, [(0, 0)] + [(1, 1) if a == axis else (0, 0) for a in (1, 2)], mode="edge")
            lo, mid, hi = (np.take(padded, range(k, k + 28), axis=axis) for k in range(3))
            want = 0.25 * lo + 0.5 * mid + 0.25 * hi
    got = blur(bits.reshape(4, 784).astype(np.float32), with_passes(6)).reshape(4, 28, 28)
    assert np.array_equal(got.astype(np.float64), want)  # every value is a multiple of 2^-24


def mean_run_length(binary: np.ndarray) -> float:
    """Mean length of runs of equal values along the rows and the columns of [N, 28, 28] images."""
    lengths = []
    for images in (binary, binary.transpose(0, 2, 1)):
        lines = images.reshape(-1, images.shape[-1])
        runs = (lines[:, 1:] != lines[:, :-1]).sum(1) + 1
        lengths.append(lines.shape[1] / runs.mean())
    return float(np.mean(lengths))


def test_thresholded_masks_have_large_balanced_regions():
    bits = np.random.default_rng(1).integers(0, 2, (300, 784)).astype(np.float32)
    mask = masks(bits).reshape(300, 28, 28)
    assert set(np.unique(mask)) == {0.0, 1.0}
    raw, blurred = mean_run_length(bits.reshape(300, 28, 28)), mean_run_length(mask)
    assert raw < 2.1 and blurred > 3 * raw, (raw, blurred)
    assert 0.45 < mask.mean() < 0.55
    assert 0.4 < mask[:, 0, :].mean() < 0.6  # edges as balanced as the middle (replicate padding)
    per_image = mask.reshape(300, -1).mean(1)
    assert np.mean((per_image > 0.05) & (per_image < 0.95)) > 0.95  # nearly every negative mixes both digits


def test_hybrid_images_mix_two_digits_of_different_classes():
    x, y = load_mnist("builtin", "train")
    model = dataclasses.replace(UNSUPERVISED, training=dataclasses.replace(UNSUPERVISED.training, batch_size=50))
    plan = epoch_plan(model, len(x), epoch=0, seed=3, labels=y)
    rows, partners = plan.order[0], plan.partners[0]
    assert np.all(y[rows] != y[partners])
    out = TorchProgram(build_program(model, "hybrid_negatives", 50)).run_numpy(
        {"x": x[rows], "x_other": x[partners], "mask_bits": plan.mask_bits(0, 784)})
    neg, mask = out["negatives"], out["mask"]
    assert np.all((neg == x[rows]) | (neg == x[partners]))  # every pixel is one of the two sources
    assert np.array_equal(neg, np.where(mask == 1, x[rows], x[partners]))
    from_first = ((neg == x[rows]) & (x[rows] != x[partners])).sum(1)
    from_second = ((neg == x[partners]) & (x[rows] != x[partners])).sum(1)
    assert np.mean((from_first > 0) & (from_second > 0)) > 0.9


@pytest.mark.parametrize("labels", [[0, 1], [0, 1, 0], [3, 3, 3, 1], [1, 1, 0, 0, 1, 1]])
def test_partners_always_have_another_label(labels):
    labels = np.array(labels)
    for seed in range(20):
        partners = different_label_partners(np.random.default_rng(seed), labels)
        assert np.all(labels[partners] != labels)


def test_partners_need_two_classes():
    with pytest.raises(ValueError, match="two classes"):
        different_label_partners(np.random.default_rng(0), np.array([4, 4, 4]))


def test_partners_and_mask_bits_are_fixed_by_seed_and_epoch():
    y = np.random.default_rng(0).integers(0, 10, 1000)
    a, b, c = (epoch_plan(UNSUPERVISED, 1000, e, 7, y) for e in (2, 2, 3))
    assert np.array_equal(a.partners, b.partners) and np.array_equal(a.packed_bits, b.packed_bits)
    assert not np.array_equal(a.partners, c.partners) and not np.array_equal(a.packed_bits, c.packed_bits)
    bits = a.mask_bits(0, 784)
    assert bits.dtype == np.float32 and bits.shape == (100, 784) and 0.45 < bits.mean() < 0.55


def test_unsupervised_models_have_a_softmax_readout_and_no_goodness_readout():
    model = dataclasses.replace(UNSUPERVISED, layers=tuple(dataclasses.replace(layer, size=16) for layer in UNSUPERVISED.layers))
    with pytest.raises(FFCompileError, match="unsupervised.*use the softmax readout"):
        build_program(model, "infer_goodness", 4)
    program = build_program(model, "infer_softmax", 4)
    assert sorted(v.name for v in program.inputs if "." not in v.name) == ["x"]
    params, _ = init_state(model, seed=0)
    params = {k: v + np.float32(0.1) for k, v in params.items()}
    x = np.random.default_rng(0).random((4, 784), dtype=np.float32)
    out = TorchProgram(program).run_numpy({**{v.name: params[v.name] for v in program.inputs if v.name != "x"}, "x": x})

    def rms(h):
        return h / np.sqrt((h ** 2).mean(1, keepdims=True) + 1e-8)

    h, features = x, []  # the plain image goes in: no label pixels overwrite it
    for layer in model.layers:
        h = np.maximum(rms(h) @ params[f"{layer.name}.weight"].T + params[f"{layer.name}.bias"], 0)
        if layer.name in model.readout.softmax_layers:
            features.append(rms(h))
    logits = np.concatenate(features, 1) @ params["softmax.weight"].T + params["softmax.bias"]
    want = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(out["probs"], want / want.sum(1, keepdims=True), rtol=1e-4)


def test_label_negatives_are_refused_without_labels_and_hybrids_with_them():
    supervised = load_model(REPO / "models" / "mnist-small.toml")
    with pytest.raises(FFCompileError, match="does not use hybrid-image negatives"):
        build_program(supervised, "hybrid_negatives", 4)
    hybrid_supervised = dataclasses.replace(supervised, negatives=dataclasses.replace(supervised.negatives, kind="hybrid_image"))
    with pytest.raises(FFCompileError, match="unsupervised models only"):
        build_program(hybrid_supervised, "train_step", 4)


def test_hybrid_examples_picture(tmp_path):
    from ffcompile.reference.plots import hybrid_examples

    x, y = load_mnist("builtin", "train")
    path = hybrid_examples(UNSUPERVISED, x[:300], y[:300], tmp_path / "hybrid.png", count=3)
    assert path.stat().st_size > 1000
