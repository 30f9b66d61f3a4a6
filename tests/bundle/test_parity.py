"""The compiled onnxruntime programs against the PyTorch reference, and the harness itself."""

import numpy as np
import pytest

from ffcompile.data import load_mnist
from ffcompile.parity import (MIN_JUDGED_STEPS, PROGRAM_ATOL, PROGRAM_RTOL, plan_checks, summary_lines,
                              trajectory_parity, verify, wrong_label_margin)
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


class DriftingFloat64:
    """A reference whose float64 side is pushed off its fp32 side by ``rate`` (rel, in h2.weight)
    every step, and then drifts as a chaotic training run's does (measured on mnist-unsupervised; see the parity
    module doc). Its fp32 side is the real reference."""

    def __init__(self, reference, rate):
        self.reference, self.rate, self.f32 = reference, rate, reference.f32

    def run32(self, feeds):
        return self.reference.run32(feeds)

    def run64(self, feeds):
        out = dict(self.reference.run64(feeds))
        out["new.h2.weight"] = out["new.h2.weight"] + self.rate * np.abs(out["new.h2.weight"]).max()
        return out


def _drifting_trajectory(loaded, train_data, rate, steps):
    x, y = train_data
    plan = plan_checks(loaded.model, ["train_step"], loaded.params, loaded.state, loaded.step, x, y, 100)
    reference = DriftingFloat64(plan.references["train_step"], rate)
    return trajectory_parity(loaded.programs["train_step"].run, reference, plan.ties, plan.params, plan.state,
                             plan.trajectory_feeds, steps)


def test_trajectory_stops_where_the_reference_stops_being_one(loaded, train_data):
    """Past the step where fp32 and float64 references differ by more than 1e-2, nothing is
    judged; a horizon after MIN_JUDGED_STEPS passes, one before it fails with the reason."""
    t = _drifting_trajectory(loaded, train_data, 1e-4, 40)  # the horizon comes at step ~23
    h = t["reference_horizon"]
    assert t["passed"] and t["within_strict_tolerance"] and h["reference_rel_vs_float64"] > 1e-2
    assert MIN_JUDGED_STEPS <= t["judged_steps"] == len(t["per_step"]) < 40
    assert h["step"] == t["per_step"][-1]["step"] + 1

    early = _drifting_trajectory(loaded, train_data, 4e-3, 40)
    assert not early["passed"] and early["judged_steps"] < MIN_JUDGED_STEPS
    assert "too short" in early["reference_horizon"]["why_failed"]
    report = {"passed": False, "model": "m", "target": "t", "backend": "b", "device": "d",
              "summary": {"programs": {}, "trajectory": {**early, "max_rel": 0.0, "worst_tensor": None,
                                                          "negative_label_events": 0}}}
    assert any("the fp32 reference itself" in line and "too short" in line for line in summary_lines(report))


def test_wrong_label_margin():
    probs = np.array([[0.5, 0.25, 0.25]])
    # true label 0: wrong labels 1 and 2 with CDF [0, 0.5, 1] -> boundary at 0.5
    assert wrong_label_margin(probs, np.array([0]), np.array([0.5]), 3, 0.0)[0] == pytest.approx(0.0)
    assert wrong_label_margin(probs, np.array([0]), np.array([0.3]), 3, 0.0)[0] == pytest.approx(0.2)
