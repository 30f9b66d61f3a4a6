"""The compiled onnxruntime programs against the PyTorch reference, and the harness itself."""

from types import SimpleNamespace

import numpy as np
import pytest

from ffcompile.data import load_mnist
from ffcompile.reference import parity
from ffcompile.reference.parity import MIN_JUDGED_FRACTION, PROGRAM_ATOL, PROGRAM_RTOL, plan_checks, summary_lines, trajectory_parity, verify, wrong_label_margin
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
    every step, and then drifts as a chaotic training run's does. Its fp32 side is the real one."""

    def __init__(self, reference, rate):
        self.reference, self.rate, self.f32 = reference, rate, reference.f32

    def run32(self, feeds):
        return self.reference.run32(feeds)

    def run64(self, feeds):
        out = dict(self.reference.run64(feeds))
        out["new.h2.weight"] = out["new.h2.weight"] + self.rate * np.abs(out["new.h2.weight"]).max()
        return out


class Departing:
    """A backend that leaves the reference by 3e-4 (rel, in h2.weight) at the given steps."""

    def __init__(self, program, steps):
        self.program, self.steps = program, set(steps)

    def run(self, feeds):
        out = dict(self.program.run(feeds))
        if int(feeds["step"]) in self.steps:
            out["new.h2.weight"] = out["new.h2.weight"] + 3e-4 * np.abs(out["new.h2.weight"]).max()
        return out


class DippingFloat64(DriftingFloat64):
    """A float64 side pushed ``rate`` (rel, in h2.weight) off the fp32 side at one step, then back
    onto it at the next: the reference's own drift rises, then dips, as measured in chaotic
    stretches of real runs (mnist-small after 5 epochs: 1.1e-4 at one step, 6e-5 at the next)."""

    def __init__(self, reference, rate, at):
        super().__init__(reference, rate)
        self.at, self.last32 = at, None

    def run32(self, feeds):
        self.last32 = self.reference.run32(feeds)  # the harness steps the fp32 side just before float64
        return self.last32

    def run64(self, feeds):
        step = int(feeds["step"])
        if step == self.at + 1:
            return {k: np.asarray(v, np.float64) for k, v in self.last32.items()}
        out = dict(self.reference.run64(feeds))
        if step == self.at:
            out["new.h2.weight"] = out["new.h2.weight"] + self.rate * np.abs(out["new.h2.weight"]).max()
        return out


def _trajectory(loaded, train_data, steps, rate=0.0, departing=(), backend=None, dip_at=None):
    x, y = train_data
    plan = plan_checks(loaded.model, ["train_step"], loaded.params, loaded.state, loaded.step, x, y, 100)
    reference = (DriftingFloat64(plan.references["train_step"], rate) if dip_at is None
                 else DippingFloat64(plan.references["train_step"], rate, dip_at))
    backend = Departing(backend or loaded.programs["train_step"], departing)
    return trajectory_parity(backend.run, reference, plan.ties, plan.params, plan.state, plan.trajectory_feeds, steps)


def test_float64_side_restarts_where_the_reference_stops_being_one(loaded, train_data):
    """Where fp32 and float64 references differ by more than 1e-3, the float64 side and the backend
    restart from the fp32 state; a backend within 1e-4 of the fp32 reference is judged at every step."""
    t = _trajectory(loaded, train_data, 30, rate=1e-4)  # past 1e-3 within a few steps, again after each restart
    assert t["passed"] and t["within_strict_tolerance"] and t["judged_steps"] == 30
    assert t["resyncs"] and all("step judged" in r["cause"] for r in t["resyncs"])


def test_backend_off_a_lost_reference_is_not_judged_there_and_restarts(loaded, train_data):
    """Every step past the horizon (rate 2e-2): a backend 3e-4 off the fp32 reference at two steps
    is not judged there, restarts, and passes; off at most steps, it fails: too few judged."""
    t = _trajectory(loaded, train_data, 12, rate=2e-2, departing=(6, 9))
    assert t["passed"] and t["judged_steps"] == 10 and t["within_strict_tolerance"]
    assert [r["step"] for r in t["resyncs"] if "step judged" not in r["cause"]] == [6, 9]
    assert [r["step"] for r in t["per_step"] if not r["judged"]] == [6, 9]

    bad = _trajectory(loaded, train_data, 12, rate=2e-2, departing=range(4, 15))
    assert not bad["passed"] and bad["judged_steps"] < MIN_JUDGED_FRACTION * 12 and "too few" in bad["why_failed"]
    report = {"passed": False, "model": "m", "target": "t", "backend": "b", "device": "d",
              "summary": {"programs": {}, "trajectory": {**bad, "max_rel": 0.0, "worst_tensor": None,
                                                          "negative_label_events": 0}}}
    lines = summary_lines(report)
    assert any("restarted from the same weights" in line for line in lines) and any("too few" in line for line in lines)


def test_a_dip_in_the_reference_drift_does_not_tighten_the_floor(loaded, train_data):
    """The float64 floor of a stretch is the largest drift the reference reached on it: a backend
    3e-4 off at step 7, the step after the reference was 5e-4 from float64, passes although the
    reference's own drift dipped back to rounding at step 7; the same departure with no drift
    before it fails (next test)."""
    t = _trajectory(loaded, train_data, 10, rate=5e-4, departing=(7,), dip_at=6)
    assert t["passed"] and t["judged_steps"] == 10, (t["why_failed"], t["resyncs"])
    step7 = next(r for r in t["per_step"] if r["step"] == 7)
    assert step7["float64_floor"]["h2.weight"]["state_floor_rel"] >= 4e-4


def test_a_backend_off_a_sound_reference_is_still_judged(loaded, train_data):
    """No re-synchronization while the reference holds: the same departure fails."""
    t = _trajectory(loaded, train_data, 12, departing=(6,))
    assert not t["passed"] and t["resyncs"] == [] and t["judged_steps"] == 12
    assert t["why_failed"] and "step 6" in t["why_failed"] and "h2.weight" in t["why_failed"], t["why_failed"]


def test_sampling_tie_restarts_the_backend(loaded, train_data, monkeypatch):
    """A negative label drawn differently on a tie (every margin counts as one here) leaves that
    step unjudged and restarts the backend from the reference."""
    monkeypatch.setattr(parity, "LABEL_TIE", 10.0)
    backend = loaded.programs["train_step"]

    class OneWrongLabelAt6:
        def run(self, feeds):
            out = dict(backend.run(feeds))
            if int(feeds["step"]) == 6:
                out["negative_labels"] = (out["negative_labels"] + 1) % 10
            return out

    t = _trajectory(loaded, train_data, 10, backend=OneWrongLabelAt6())
    assert t["passed"] and t["judged_steps"] == 9
    assert [r["step"] for r in t["resyncs"]] == [6] and "tie" in t["resyncs"][0]["cause"]
    assert {e["cause"].split(":")[0] for e in t["negative_label_events"]} == {"sampling tie"}


def test_wrong_label_margin():
    probs = np.array([[0.5, 0.25, 0.25]])
    # true label 0: wrong labels 1 and 2 with CDF [0, 0.5, 1] -> boundary at 0.5
    assert wrong_label_margin(probs, np.array([0]), np.array([0.5]), 3, 0.0)[0] == pytest.approx(0.0)
    assert wrong_label_margin(probs, np.array([0]), np.array([0.3]), 3, 0.0)[0] == pytest.approx(0.2)


class Amplifying:
    """A training step that, at step 6 only, adds ``gain * (h2.weight - base)`` to its new h2.weight:
    a chaotic step, which multiplies any difference from the state ``base`` by ``gain``."""

    def __init__(self, run, base, gain):
        self.inner, self.base, self.gain = run, base, gain

    def __call__(self, feeds):
        out = dict(self.inner(feeds))
        if int(feeds["step"]) == 6:
            new = out["new.h2.weight"]
            out["new.h2.weight"] = (new + self.gain * (np.asarray(feeds["h2.weight"], np.float64) - self.base)).astype(new.dtype)
        return out


class AmplifyingReference:
    def __init__(self, reference, base32, base64, gain):
        self.f32 = reference.f32
        self.run32 = Amplifying(reference.run32, base32, gain)
        self.run64 = Amplifying(reference.run64, base64, gain)


def _chaotic_trajectory(loaded, train_data, backend_gain: float, steps=10, gain=1e4):
    """A trajectory through an amplifying step 6 whose ``base`` is each reference side's own state
    there: only the backend's difference from the fp32 reference trajectory is amplified."""
    x, y = train_data
    plans = [plan_checks(loaded.model, ["train_step"], loaded.params, loaded.state, loaded.step, x, y, 100)
             for _ in range(2)]
    plain, seen = plans[0].references["train_step"], {}

    def recorder(run, side):
        def record(feeds):
            seen.setdefault((side, int(feeds["step"])), np.asarray(feeds["h2.weight"], np.float64))
            return run(feeds)
        return record

    recording = SimpleNamespace(f32=plain.f32, run32=recorder(plain.run32, 32), run64=recorder(plain.run64, 64))
    program = loaded.programs["train_step"]
    trajectory_parity(program.run, recording, plans[0].ties, plans[0].params, plans[0].state,
                      plans[0].trajectory_feeds, steps)
    plan = plans[1]
    reference = AmplifyingReference(plan.references["train_step"], seen[32, 6], seen[64, 6], gain)
    backend = Amplifying(program.run, seen[32, 6], backend_gain)
    return trajectory_parity(backend, reference, plan.ties, plan.params, plan.state, plan.trajectory_feeds, steps)


def test_a_step_that_amplifies_the_backends_rounding_restarts_it(loaded, train_data):
    """At a chaotic step the backend lands far from the reference trajectory, but where the
    reference lands when stepped from the backend's own state: that step is not judged and the
    backend restarts from the reference. A backend that computes the step differently fails."""
    t = _chaotic_trajectory(loaded, train_data, backend_gain=1e4)
    step6 = next(r for r in t["per_step"] if r["step"] == 6)
    assert step6["own_state_check"]["explained"], step6
    assert t["passed"] and t["judged_steps"] == 9
    assert [r["step"] for r in t["resyncs"]] == [6] and "stepped from the backend's state" in t["resyncs"][0]["cause"]

    bad = _chaotic_trajectory(loaded, train_data, backend_gain=2e4)  # the same step, computed wrong
    step6 = next(r for r in bad["per_step"] if r["step"] == 6)
    assert not bad["passed"] and bad["resyncs"] == [] and not step6["own_state_check"]["explained"]


def test_summary_counts_the_checks_steps_from_one_and_says_why_the_runs_restarted():
    """A check that starts at training step 2001 of its run calls that step 1; restarts are named
    by their reason in words, not by the rule."""
    t = {"passed": True, "steps": 100, "judged_steps": 97, "within_strict_tolerance": False,
         "first_step_beyond_strict_tolerance": 2014, "worst_tensor": "h1.weight", "max_rel": 5e-3,
         "negative_label_events": 1, "why_failed": None,
         "resyncs": [{"step": 2016, "cause": "the fp32 reference is 2.8e-02 (rel) from float64 in h1.bias"},
                     {"step": 2031, "cause": "the fp32 reference is 1.1e-03 (rel) from float64 in h2.weight"},
                     {"step": 2044, "cause": "a negative label drawn differently on a sampling tie"}]}
    report = {"passed": True, "model": "m", "target": "t", "backend": "b", "device": "d",
              "summary": {"programs": {}, "trajectory": t}, "trajectory": {"first_step": 2001}}
    text = "\n".join(summary_lines(report))
    assert "steps 1-13 within 1e-4" in text and "from step 14 " in text
    assert "2 times (steps 16, 31) the runs were restarted from the same weights: fp32 rounding" in text
    assert "once (step 44) the runs were restarted" in text and "97 of 100 steps compared" in text
    assert "re-synchron" not in text and "2016" not in text
