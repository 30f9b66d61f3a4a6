"""ffcompile/reference/hand_step.py, the hand-written PyTorch baseline of bench/bench_step.py, computes the same
train step as the lowered ``train_step`` (new parameters, optimizer state, negative labels)."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from ffcompile.core.spec import DenseLayer, Readout, load_model
from ffcompile.lowering import build_program, init_state
from ffcompile.reference import hand_step as hand
from ffcompile.reference.interpreter import TorchProgram

REPO = Path(__file__).parents[2]


@pytest.mark.parametrize("spec", ["mnist-small", "mnist-supervised"])  # Adam; Hinton's recipe (SGD, groups)
def test_hand_written_step_matches_train_step(spec):
    model = load_model(REPO / "models" / f"{spec}.toml")
    model = dataclasses.replace(model, layers=(DenseLayer("h1", 40), DenseLayer("h2", 30), DenseLayer("h3", 20)),
                                readout=Readout(goodness_layers=("h2", "h3"), softmax_layers=("h2", "h3")))
    assert hand.supported(model) is None
    batch, rng = 12, np.random.default_rng(0)
    params, state = init_state(model, 0)
    state = {k: np.abs(rng.normal(0, 1e-3, v.shape)).astype(np.float32) for k, v in state.items()}
    feeds = {**params, **state, "x": rng.random((batch, 784), dtype=np.float32),
             "y": rng.integers(0, 10, batch), "u": rng.random(batch, dtype=np.float32),
             "lr": np.float32(1e-3), "step": np.float32(7)}
    program = build_program(model, "train_step", batch)
    feeds = {k: v for k, v in feeds.items() if k in {i.name for i in program.inputs}}
    want = TorchProgram(program).run_numpy(feeds)
    P = {k: torch.tensor(v) for k, v in params.items()}
    S = {k: torch.tensor(v) for k, v in state.items()}
    negative = hand.hand_step(model)(P, S, torch.tensor(feeds["x"]), torch.tensor(feeds["y"]),
                                     torch.tensor(feeds["u"]), 1e-3, 7.0)
    assert np.array_equal(negative.numpy(), want["negative_labels"])
    for name, got in {**P, **S}.items():
        ref = want[f"new.{name}"]
        assert np.max(np.abs(got.numpy() - ref)) <= 1e-5 * np.max(np.abs(ref)) + 1e-7, name
    assert hand.supported(dataclasses.replace(model, negatives=dataclasses.replace(model.negatives, kind="random_label")))
