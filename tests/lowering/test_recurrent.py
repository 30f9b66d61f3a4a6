"""The recurrent net of sec. 3.4: damped synchronous updates against a numpy rollout written out
by hand, the iteration-averaged goodness readout, the analytic (no-BPTT) updates against the
autograd oracle, and ONNX-vs-torch parity of its programs."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from ffcompile.compiler.onnx_emit import to_onnx
from ffcompile.core.primitives import PRIMITIVES
from ffcompile.reference.interpreter import TorchProgram
from ffcompile.core.errors import FFCompileError
from ffcompile.lowering import build_program, init_state
from ffcompile.reference.oracle import oracle_recurrent_train_step
from ffcompile.runtime.ort import OrtProgram
from ffcompile.core.spec import DenseLayer, Goodness, InputSpec, LabelEmbedding, Model, Negatives, Normalization, Optimizer, PeerNorm, Readout, Recurrent, Regularizers, SpecError, Training, load_model, validate
from outputs import assert_outputs_match  # tests/outputs.py (tests/ is on sys.path via its conftest)

MODELS = Path(__file__).parents[2] / "models"
BATCH = 5


def tiny(goodness="ssq", norm="rms", negatives="hard_label", optimizer=Optimizer(kind="sgd", lr=0.05, momentum=0.9),
         weight_decay=0.0, layers=3, readout=("h2", "h3")) -> Model:
    return Model(
        name="tiny-recurrent",
        input=InputSpec(size=16, image_shape=(4, 4), label=LabelEmbedding(kind="top_layer", classes=4)),
        layers=tuple(DenseLayer(f"h{i + 1}", 7 + i) for i in range(layers)),
        normalization=Normalization(kind=norm),
        goodness=Goodness(kind=goodness, threshold_per_unit=0.5),
        regularizers=Regularizers(weight_decay=weight_decay), optimizer=optimizer,
        negatives=Negatives(kind=negatives), readout=Readout(goodness_layers=readout),
        recurrent=Recurrent(iterations=4, damping=0.3, readout_iterations=(2, 3)),
        training=Training(batch_size=BATCH),
    )


def random_params(model, rng, dtype=np.float64):
    params, state = init_state(model, seed=3)
    params = {k: (v + rng.normal(0, 0.2, v.shape)).astype(dtype) for k, v in params.items()}
    state = {k: np.abs(rng.normal(0, 0.05, v.shape)).astype(dtype) for k, v in state.items()}
    return params, state


def rms(v):
    return v / np.sqrt((v * v).mean(1, keepdims=True) + 1e-8)


def numpy_rollout(model, p, x, y):
    """States per iteration, spelled out: iteration 0 bottom-up, then every hidden layer from the
    previous iteration's normalized neighbours, new = 0.3 * previous + 0.7 * relu(z)."""
    names = [layer.name for layer in model.layers]
    relu = lambda v: np.maximum(v, 0)
    label = rms(np.eye(model.input.label.classes)[y])
    h, states = rms(x), []
    for name in names:
        h = relu(h @ p[f"{name}.weight"].T + p[f"{name}.bias"])
        states.append(h)
        h = rms(h)
    rollout = [states]
    for _t in range(model.recurrent.iterations):
        prev = rollout[-1]
        new = []
        for i, name in enumerate(names):
            below = rms(x) if i == 0 else rms(prev[i - 1])
            above = label if i == len(names) - 1 else rms(prev[i + 1])
            z = below @ p[f"{name}.weight"].T + above @ p[f"{name}.top_down.weight"].T + p[f"{name}.bias"]
            new.append(0.3 * prev[i] + 0.7 * relu(z))
        rollout.append(new)
    return rollout


def test_damped_synchronous_updates_match_hand_rollout():
    model = tiny()
    rng = np.random.default_rng(0)
    params, _ = random_params(model, rng)
    x, y = rng.random((BATCH, 16)), rng.integers(0, 4, BATCH)
    out = TorchProgram(build_program(model, "recurrent_states", BATCH)).run_numpy(
        {**{k: v.astype(np.float32) for k, v in params.items()}, "x": x.astype(np.float32), "y": y})
    want = numpy_rollout(model, params, x, y)
    for t, states in enumerate(want):
        for layer, h in zip(model.layers, states):
            np.testing.assert_allclose(out[f"state.{layer.name}.{t}"], h, rtol=1e-4, atol=1e-5,
                                       err_msg=f"{layer.name} at iteration {t}")


def test_readout_averages_goodness_over_the_readout_iterations():
    model = tiny(goodness="neg_ssq")
    rng = np.random.default_rng(1)
    params, _ = random_params(model, rng)
    x = rng.random((BATCH, 16))
    out = TorchProgram(build_program(model, "infer_goodness", BATCH)).run_numpy(
        {**{k: v.astype(np.float32) for k, v in params.items()}, "x": x.astype(np.float32)})
    want = np.zeros((BATCH, 4))
    for c in range(4):
        rollout = numpy_rollout(model, params, x, np.full(BATCH, c))
        # iterations 2 and 3 (inclusive), layers h2 and h3, min-ssq sign: goodness = -sum of squares
        want[:, c] = np.mean([-sum((rollout[t][i] ** 2).sum(1) for i in (1, 2)) for t in (2, 3)], axis=0)
    np.testing.assert_allclose(out["scores"], want, rtol=1e-5)
    assert np.array_equal(out["prediction"], want.argmax(1))


@pytest.mark.parametrize("readout", [("h2", "h3"), (), ("h1",)])
def test_negative_probabilities_are_the_softmax_of_each_labels_goodness_after_one_iteration(readout):
    """The program runs only the top layer once per label; the full net with every label on top
    must give the same probabilities (uniform when the top layer is not scored)."""
    model = tiny(readout=readout)
    rng = np.random.default_rng(2)
    params, _ = random_params(model, rng)
    x = rng.random((BATCH, 16))
    out = TorchProgram(build_program(model, "negative_probs", BATCH)).run_numpy(
        {**{k: v.astype(np.float32) for k, v in params.items()}, "x": x.astype(np.float32)})
    scored = [model.layer_index(n) for n in readout] or range(len(model.layers))
    logits = np.stack([sum((numpy_rollout(model, params, x, np.full(BATCH, c))[1][i] ** 2).sum(1) for i in scored)
                       for c in range(4)], axis=1)
    want = np.exp(logits - logits.max(1, keepdims=True))
    want /= want.sum(1, keepdims=True)
    np.testing.assert_allclose(out["probs"], want, rtol=1e-4, atol=1e-6)
    if readout == ("h1",):  # h1 cannot see the label after one iteration
        assert np.allclose(want, 0.25)


CASES = [
    dict(),
    dict(goodness="neg_ssq", negatives="random_label", optimizer=Optimizer(kind="adam", lr=0.01)),
    dict(norm="l2", weight_decay=1e-2, optimizer=Optimizer(kind="adam", lr=0.01), layers=2, readout=()),
]


def float64_program(program, monkeypatch) -> TorchProgram:
    """The label layer's one-of-N rows (constants and one_hot, fp32 in the backend) feed matmuls
    directly, which, unlike elementwise ops, do not promote to the float64 of the check."""
    one_hot = dataclasses.replace(PRIMITIVES["one_hot"], reference=lambda torch, idx, depth: (
        idx.unsqueeze(-1) == torch.arange(depth)).to(torch.float64))
    monkeypatch.setitem(PRIMITIVES, "one_hot", one_hot)
    runner = TorchProgram(program)
    runner.constants = {k: v.double() if v.is_floating_point() else v for k, v in runner.constants.items()}
    return runner


@pytest.mark.parametrize("case", range(len(CASES)))
def test_analytic_update_matches_autograd_without_bptt(case, monkeypatch):
    model = tiny(**CASES[case])
    rng = np.random.default_rng(7)
    params, state = random_params(model, rng)
    t64 = lambda d: {k: torch.tensor(v) for k, v in d.items()}
    params, state = t64(params), t64(state)
    x, y, u = torch.tensor(rng.random((BATCH, 16))), torch.tensor(rng.integers(0, 4, BATCH)), torch.tensor(rng.random(BATCH))
    lr, step = model.optimizer.lr, 4
    program = float64_program(build_program(model, "train_step", BATCH), monkeypatch)
    feeds = {**params, **state, "x": x, "y": y, "u": u, "lr": torch.tensor(lr, dtype=torch.float64),
             "step": torch.tensor(float(step), dtype=torch.float64)}
    with torch.no_grad():
        out = program.run({v.name: feeds[v.name] for v in program.program.inputs})
    want_params, want_state, want_negatives = oracle_recurrent_train_step(model, params, state, x, y, u, lr, step)
    assert torch.equal(out["negative_labels"], want_negatives)
    assert not torch.any(want_negatives == y)
    assert any(name.endswith("top_down.weight") for name in want_params)
    for name, want in {**want_params, **want_state}.items():
        reference = want - feeds[name] if name in want_params else want
        scale = max(float(reference.abs().max()), 1e-12)
        err = float((out[f"new.{name}"] - want).abs().max())
        assert err <= 1e-6 * scale, f"{name}: max abs err {err:.3g} vs update scale {scale:.3g}"


@pytest.mark.parametrize("program_name", ["train_step", "infer_goodness", "recurrent_states"])
def test_onnx_program_matches_torch_reference(program_name):
    model = load_model(MODELS / "mnist-recurrent.toml")
    model = dataclasses.replace(model, layers=tuple(dataclasses.replace(layer, size=24) for layer in model.layers))
    rng = np.random.default_rng(2)
    params, state = random_params(model, rng, np.float32)
    all_feeds = {**params, **state, "x": rng.random((BATCH, 784), dtype=np.float32),
                 "y": rng.integers(0, 10, BATCH).astype(np.int64), "u": rng.random(BATCH, dtype=np.float32),
                 "lr": np.float32(1e-3), "step": np.float32(3)}
    program = build_program(model, program_name, BATCH)
    feeds = {v.name: all_feeds[v.name] for v in program.inputs}
    want = TorchProgram(program).run_numpy(feeds)
    got = OrtProgram(to_onnx(program).SerializeToString(), name=program_name).run(feeds)
    assert_outputs_match(got, want, atol=1e-5, rtol=1e-5)


def test_spec_ties_the_top_layer_label_to_recurrence():
    model = tiny()
    with pytest.raises(SpecError, match="input.label.kind.*recurrent"):
        validate(dataclasses.replace(tiny(negatives="random_label"), recurrent=None))
    with pytest.raises(SpecError, match="top layer"):
        validate(dataclasses.replace(model, input=dataclasses.replace(model.input, label=LabelEmbedding())))
    with pytest.raises(SpecError, match="peer_norm"):
        validate(dataclasses.replace(model, regularizers=Regularizers(peer_norm=PeerNorm())))
    with pytest.raises(FFCompileError, match="infer_softmax.*softmax_layers is empty"):
        build_program(model, "infer_softmax", BATCH)
