"""The compiled onnxruntime programs against the PyTorch reference, and the harness itself."""

import numpy as np
import pytest

from ffcompile.data import load_mnist
from ffcompile.parity import PROGRAM_ATOL, PROGRAM_RTOL, verify, wrong_label_margin
from ffcompile.runtime.bundle import load_bundle


@pytest.fixture(scope="module")
def loaded(tiny_bundle):
    return load_bundle(tiny_bundle)


@pytest.fixture(scope="module")
def train_data():
    return load_mnist(None, "train")


def run_verify(bundle, runners, x, y, steps):
    return verify(bundle.model, bundle.target, runners, bundle.params, bundle.state, bundle.step, x, y,
                  bundle.manifest["batch"]["infer"], steps)


def test_every_program_matches_torch_on_random_and_real_inputs(loaded, train_data):
    report = run_verify(loaded, loaded.programs, *train_data, steps=0)
    assert report["passed"]
    seen = set()
    for entry in report["programs"]:
        seen.add((entry["program"], entry["inputs"]))
        assert entry["integer_mismatches"] == {}
        for name, t in entry["tensors"].items():
            # within the plain fp32 tolerance: no float64 allowance needed on these inputs
            assert t["max_abs"] <= PROGRAM_ATOL + PROGRAM_RTOL * t["ref_max"], (entry["program"], name, t)
    assert seen == {(p, k) for p in ("train_step", "infer_goodness", "infer_softmax") for k in ("random", "real")}


def test_100_step_trajectory_within_1e_4(loaded, train_data):
    report = run_verify(loaded, {"train_step": loaded.programs["train_step"]}, *train_data, steps=100)
    t = report["trajectory"]
    assert t["passed"] and t["within_strict_tolerance"], t["worst_rel"]
    assert len(t["per_step"]) == 100 and t["negative_label_events"] == []
    for record in t["per_step"]:
        for name, (max_abs, max_rel) in record["tensors"].items():
            assert max_rel <= 1e-4, (record["step"], name, max_rel)
    assert set(t["worst_rel"]) >= set(loaded.params)


class Skewed:
    """A deliberately wrong backend: one weight update off by 1e-3 of its scale."""

    def __init__(self, program):
        self.program = program

    def run(self, feeds):
        out = dict(self.program.run(feeds))
        w = out["new.h2.weight"].copy()
        w[0, 0] += 1e-3 * np.abs(w).max()
        out["new.h2.weight"] = w
        return out


class WrongLabels:
    def __init__(self, program):
        self.program = program

    def run(self, feeds):
        out = dict(self.program.run(feeds))
        out["negative_labels"] = (out["negative_labels"] + 1) % 10
        return out


def test_harness_catches_a_wrong_backend(loaded, train_data):
    report = run_verify(loaded, {"train_step": Skewed(loaded.programs["train_step"])}, *train_data, steps=3)
    assert not report["passed"]
    entry = report["programs"][0]
    assert not entry["passed"] and not entry["tensors"]["new.h2.weight"]["passed"]
    assert not report["trajectory"]["passed"]


def test_harness_catches_wrong_negative_labels(loaded, train_data):
    report = run_verify(loaded, {"train_step": WrongLabels(loaded.programs["train_step"])}, *train_data, steps=1)
    assert not report["passed"]
    rows = report["programs"][0]["integer_mismatches"]["negative_labels"]
    assert len(rows) == 20 and not any(r["tie"] for r in rows)
    assert any(e["cause"] == "mismatch" for e in report["trajectory"]["negative_label_events"])


def test_wrong_label_margin():
    probs = np.array([[0.5, 0.25, 0.25]])
    # true label 0: wrong labels 1 and 2 with CDF [0, 0.5, 1] -> boundary at 0.5
    assert wrong_label_margin(probs, np.array([0]), np.array([0.5]), 3, 0.0)[0] == pytest.approx(0.0)
    assert wrong_label_margin(probs, np.array([0]), np.array([0.3]), 3, 0.0)[0] == pytest.approx(0.2)
