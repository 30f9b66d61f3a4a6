"""The parity harness: a bundle's compiled programs against the PyTorch reference.

Three checks, each reporting max abs and max rel error per tensor (rel = abs error / max |ref|
of that tensor, or the abs error where the reference is all zeros):

1. **Programs on random inputs** (random weights, optimizer state, images, labels, uniforms, step).
2. **Programs on real data** with the bundle's own weights and state.
3. **A k-step training trajectory** in which each side feeds its own outputs back into its next
   step, with the batches, uniforms and learning rates of ``ffcompile.loop``.

Tolerances (fp32):

- programs: ``max|out - ref| <= 1e-5 + 1e-5 * max|ref|`` per tensor;
- trajectory: ``max|out - ref| <= 1e-4 * max|ref|`` per parameter and optimizer-state tensor
  after every step;
- integer outputs (``prediction``, ``negative_labels``) must match exactly, except rows where the
  choice is a tie under fp32 rounding: argmax gaps within the float tolerance, or a uniform within
  1e-5 of a boundary of the wrong-label CDF (computed in float64). Such rows are listed.

When a tensor misses its fp32 tolerance, the harness asks whether the *reference itself* is that
far from exact arithmetic: it evaluates the same program in float64 and accepts the tensor when
``max|out - ref64| <= tol + 10 * max|ref32 - ref64|``, i.e. the compiled program is at most 10x as
far from the float64 result as the fp32 reference is. Such tensors are reported with both numbers.
A wrong program is off by orders of magnitude more, from its first step (the program checks see
it); the factor only absorbs which of two rounding-level perturbations happens to grow faster.

Past a point, FF training amplifies rounding differences until the fp32 reference no longer
defines a trajectory (it drifts from float64 as far as any backend does). So the trajectory
**re-synchronizes**: at a step where the fp32 reference is more than ``REFERENCE_HORIZON_RTOL``
from float64 in any tensor, the float64 side and the backend restart from the fp32 reference's
state; the step is judged only if the backend was within the strict 1e-4 of the fp32 reference
there. A negative label drawn differently on a sampling tie leaves its step unjudged and restarts
the backend. These restarts depend on the reference alone, never on how far off the backend is,
so a wrong backend still fails at the next judged step; at least ``MIN_JUDGED_FRACTION`` of the
steps must be judged. Where a judged step misses both tolerances, the reference is stepped from
the backend's own inputs: if the backend is within the program tolerance of that, and each missing
tensor's gap is at least ``1 / OWN_STATE_SHARE`` times that step's own error, the step amplified
the difference between two states; it is not judged and the backend restarts from the reference.
Fresh Adam bundles take 2 shared reference steps first (Adam's first step turns rounding noise
in a zero gradient into a move of +-lr). The measurements behind each choice: docs/design.md.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ..core.spec import Model
from ..loop.epochs import epoch_plan, learning_rate, step_feeds, uses_hybrid_negatives
from ..loop.progress import Phase
from ..lowering import build_program, is_train_program, negative_probs_program
from .interpreter import TorchProgram

FORMAT = "ffcompile-parity-1"
PROGRAM_ATOL = 1e-5
PROGRAM_RTOL = 1e-5
TRAJECTORY_RTOL = 1e-4
FLOAT64_FACTOR = 10.0
REFERENCE_HORIZON_RTOL = 1e-3
MIN_JUDGED_FRACTION = 0.5
OWN_STATE_SHARE = 1e-2
LABEL_TIE = 1e-5
INTEGER_OUTPUTS = ("prediction", "negative_labels")

TOLERANCES = {
    "programs": f"max|out - ref| <= {PROGRAM_ATOL:g} + {PROGRAM_RTOL:g} * max|ref| per float tensor",
    "trajectory": f"max|out - ref| <= {TRAJECTORY_RTOL:g} * max|ref| per parameter/optimizer tensor after every step",
    "integers": f"exact, except ties: argmax gap within the float tolerance, or |u - CDF boundary| <= {LABEL_TIE:g}",
    "float64_floor": f"a float tensor outside its tolerance still passes if max|out - ref64| <= tolerance + "
                     f"{FLOAT64_FACTOR:g} * max|ref32 - ref64| (no less accurate than the fp32 reference, within "
                     f"{FLOAT64_FACTOR:g}x, against the float64 evaluation of the same program); in trajectories "
                     f"max|ref32 - ref64| is at least the largest relative distance the reference reached over "
                     f"the whole state since the float64 side last restarted, times max|ref64|",
    "resync": f"a step where the fp32 reference is more than {REFERENCE_HORIZON_RTOL:g} (rel) from float64 in some "
              f"tensor restarts the float64 side and the backend from the fp32 reference's state (the step judged only "
              f"if the backend was within the strict tolerance); a negative label drawn differently on a sampling tie "
              f"restarts the backend (the step unjudged); so does a step that misses its tolerances while the reference "
              f"stepped from the backend's own state lands within the program tolerance of it and at least "
              f"{1 / OWN_STATE_SHARE:g}x closer than the reference trajectory (the step amplified the states' "
              f"difference); at least {MIN_JUDGED_FRACTION:.0%} of the steps must be judged",
}


class Reference:
    """One program in the torch reference, in float32 and in float64."""

    def __init__(self, model: Model, name: str, batch: int):
        program = build_program(model, name, batch)
        self.f32 = TorchProgram(program)
        self.f64 = TorchProgram(program, float_dtype=torch.float64)

    def run32(self, feeds: dict) -> dict[str, np.ndarray]:
        return self.f32.run_numpy({k: np.asarray(v) for k, v in feeds.items()})

    def run64(self, feeds: dict) -> dict[str, np.ndarray]:
        tensors = {k: torch.as_tensor(np.asarray(v, np.float64) if np.asarray(v).dtype.kind == "f" else np.asarray(v))
                   for k, v in feeds.items()}
        with torch.no_grad():
            out = self.f64.run(tensors)
        return {k: v.numpy() for k, v in out.items()}


def _max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))) if np.size(a) else 0.0


def _max(a) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64)))) if np.size(a) else 0.0


def compare_float(out, ref32, ref64, atol: float, rtol: float, state_floor_rel: float = 0.0) -> dict:
    """``state_floor_rel`` (trajectories): the fp32 reference's largest relative distance from
    float64 over the whole state; the float64 floor of this tensor is at least that, relative to it."""
    abs_err, ref_max = _max_abs(out, ref32), _max(ref32)
    entry = {"max_abs": abs_err, "max_rel": abs_err / ref_max if ref_max > 0 else abs_err, "ref_max": ref_max,
             "tolerance": atol + rtol * ref_max}
    entry["passed"] = abs_err <= entry["tolerance"]
    if not entry["passed"] and ref64 is not None:
        floor, err64, scale = _max_abs(ref32, ref64), _max_abs(out, ref64), _max(ref64)
        entry["float64"] = {"max_abs_vs_float64": err64, "reference_max_abs_vs_float64": floor,
                            "tolerance": atol + rtol * scale + FLOAT64_FACTOR * max(floor, state_floor_rel * scale)}
        if state_floor_rel:
            entry["float64"]["state_floor_rel"] = state_floor_rel
        entry["passed"] = err64 <= entry["float64"]["tolerance"]
    return entry


def wrong_label_margin(probs: np.ndarray | None, labels, u, classes: int, min_prob: float) -> np.ndarray:
    """Per row, the distance (float64) from the uniform draw to the nearest boundary of the
    wrong-label CDF that ``lowering.labels.sample_wrong_labels`` inverts: a small margin means
    fp32 rounding may decide the draw."""
    weights = np.zeros((len(labels), classes)) if probs is None else np.asarray(probs, np.float64)
    q = (weights + min_prob) * (1.0 - np.eye(classes)[labels])
    cdf = np.cumsum(q, axis=1)
    cdf /= cdf[:, -1:]
    uu = np.maximum(np.asarray(u, np.float64), 1e-7)[:, None]
    return np.min(np.abs(cdf[:, :-1] - uu), axis=1)


class _LabelTies:
    """Decides whether a wrong-label mismatch is a sampling tie, from float64 probabilities."""

    def __init__(self, model: Model, batch: int):
        self.model = model
        program = negative_probs_program(model)
        self.probs = Reference(model, program, batch) if program else None

    def margins(self, params: dict, feeds: dict) -> np.ndarray:
        probs = None
        if self.probs is not None:
            needed = {v.name for v in self.probs.f32.program.inputs}
            probs = self.probs.run64({**{k: v for k, v in params.items() if k in needed}, "x": feeds["x"]})["probs"]
        return wrong_label_margin(probs, feeds["y"], feeds["u"], self.model.input.label.classes,
                                  self.model.negatives.min_prob)


def _prediction_ties(out: dict, ref32: dict, score_name: str, float_entry: dict) -> tuple[list, bool]:
    got, want = out["prediction"], ref32["prediction"]
    rows, ok = [], True
    for r in np.flatnonzero(got != want):
        scores = np.asarray(ref32[score_name][r], np.float64)
        gap = float(abs(scores[want[r]] - scores[got[r]]))
        tie = gap <= float_entry["tolerance"] + float_entry["max_abs"]
        ok &= tie
        rows.append({"row": int(r), "reference": int(want[r]), "backend": int(got[r]), "score_gap": gap, "tie": bool(tie)})
    return rows, ok


def compare_program(name: str, out: dict, ref32: dict, ref64: dict, ties: _LabelTies | None = None,
                    params: dict | None = None, feeds: dict | None = None) -> dict:
    tensors, mismatches, passed = {}, {}, True
    for key, want in ref32.items():
        if key in INTEGER_OUTPUTS:
            continue
        tensors[key] = compare_float(out[key], want, ref64.get(key), PROGRAM_ATOL, PROGRAM_RTOL)
        passed &= tensors[key]["passed"]
    if "prediction" in ref32:
        score = "scores" if "scores" in ref32 else "probs"
        rows, ok = _prediction_ties(out, ref32, score, tensors[score])
        passed &= ok
        if rows:
            mismatches["prediction"] = rows
    if "negative_labels" in ref32:
        wrong = np.flatnonzero(out["negative_labels"] != ref32["negative_labels"])
        if len(wrong):
            margins = ties.margins(params, feeds)
            rows = [{"row": int(r), "reference": int(ref32["negative_labels"][r]), "backend": int(out["negative_labels"][r]),
                     "cdf_margin": float(margins[r]), "tie": bool(margins[r] <= LABEL_TIE)} for r in wrong]
            passed &= all(row["tie"] for row in rows)
            mismatches["negative_labels"] = rows
    return {"program": name, "passed": bool(passed), "tensors": tensors, "integer_mismatches": mismatches}


def random_feeds(model: Model, signature_inputs, params: dict, state: dict, rng: np.random.Generator) -> dict:
    """Random but plausible inputs: weights near the given ones, non-negative optimizer state
    (Adam's second moment must be), images in [0, 1) (the hybrid negatives' partner images
    ``x_other`` too), 0/1 mask bits, any labels, any step."""
    feeds = {}
    for value in signature_inputs:
        name, shape = value.name, value.shape
        if name in params:
            feeds[name] = (params[name] + rng.normal(0, 0.05, shape)).astype(np.float32)
        elif name in state:
            feeds[name] = np.abs(rng.normal(0, 0.05, shape)).astype(np.float32)
        elif name in ("x", "x_other", "x_neg"):
            feeds[name] = rng.random(shape, dtype=np.float32)
        elif name == "mask_bits":
            feeds[name] = rng.integers(0, 2, shape).astype(np.float32)
        elif name == "y":
            feeds[name] = rng.integers(0, model.input.label.classes, shape).astype(np.int64)
        elif name == "u":
            feeds[name] = rng.random(shape, dtype=np.float32)
        elif name == "lr":
            feeds[name] = np.float32(model.optimizer.lr)
        elif name == "step":
            feeds[name] = np.float32(1)  # Adam's bias correction is largest at the first step
        else:
            raise ValueError(f"no random input for {name!r}")
    return feeds


def _batches(model: Model, x, y, seed: int, first_step: int):
    """The training loop's feeds, epoch after epoch, forever: the same plan and per-step feeds as
    ``loop.run_epoch`` (jitter shifts, hybrid negatives' partners and mask bits included)."""
    shift = None
    if model.training.jitter:
        from ..data import shift_images as shift
    labels = y if uses_hybrid_negatives(model) else None
    # Self-generated negatives come from a generation pass with infer_softmax (checked on its
    # own); the step only needs one-of-N rows, so here they are other real rows of the data.
    external = model.negatives.kind == "self_generated" and model.training.learn_hidden
    epoch = 0
    while True:
        plan = epoch_plan(model, len(x), epoch, seed, labels)
        lr = np.float32(learning_rate(model, epoch, model.training.epochs))
        stand_in = x[np.random.default_rng([seed, epoch, 99]).permutation(len(x))] if external else None
        for k in range(len(plan.order)):
            feeds = step_feeds(plan, k, x, y, lr, first_step, shift)
            if external:
                feeds["x_neg"] = stand_in[plan.order[k]]
            yield feeds
            first_step += 1
        epoch += 1


WARMUP_STEPS = 2


def _warm_up(model: Model, reference: Reference | None, params, state, step: int, feeds_iter):
    """Adam from zero state (a fresh bundle) first takes ``WARMUP_STEPS`` reference steps, shared
    by both sides, before the real-data and trajectory checks: its first step moves each weight by
    ``lr * g / (|g| + eps)``, where rounding noise decides the sign of gradients that are exactly
    zero in exact arithmetic (see the module doc). The random-input checks still run step 1."""
    if reference is None or model.optimizer.kind != "adam" or step != 0:
        return params, state, None
    needed = {v.name for v in reference.f32.program.inputs}
    for _ in range(WARMUP_STEPS):
        feeds = next(feeds_iter)
        out = reference.run32({**params, **state, **{k: v for k, v in feeds.items() if k in needed}})
        params, state = _split(params, state, out)
    return params, state, {"steps": WARMUP_STEPS, "by": "torch fp32 reference",
                           "why": "Adam's first step from zero optimizer state is ill-conditioned in fp32 for "
                                  "gradients that are zero in exact arithmetic"}


def _chain(first, rest):
    yield from first
    yield from rest


def _split(model_params, model_state, out: dict):
    return {k: out[f"new.{k}"] for k in model_params}, {k: out[f"new.{k}"] for k in model_state}


def trajectory_parity(run, reference: Reference, ties: _LabelTies, params: dict, state: dict, feeds_iter,
                      steps: int, advance=None) -> dict:
    """``steps`` train steps with the loop's feeds, each side feeding its own outputs back, with
    re-synchronizations where the reference stops being one (see the module doc). ``advance()``:
    called after each step."""
    needed = [v.name for v in reference.f32.program.inputs]
    sides = {"backend": (params, state), "ref32": (params, state), "ref64": (params, state)}
    per_step, worst, label_events, resyncs, passed, strict = [], {}, [], [], True, True
    first_step = first_beyond = first_failure = None
    stretch_drift = 0.0  # the reference's largest drift from float64 since the float64 side last restarted
    for _ in range(steps):
        feeds = next(feeds_iter)
        first_step = int(feeds["step"]) if first_step is None else first_step
        run_feeds = {k: v for k, v in feeds.items() if k in needed}
        before = sides["backend"]
        backend_in = {**before[0], **before[1], **run_feeds}
        # for the label shadow and the own-state check; at most once a step
        stepped_from_backend = functools.cache(lambda: reference.run32(backend_in))
        outs = {"backend": run(backend_in),
                "ref32": reference.run32({**sides["ref32"][0], **sides["ref32"][1], **run_feeds}),
                "ref64": reference.run64({**sides["ref64"][0], **sides["ref64"][1], **run_feeds})}
        for side, out in outs.items():
            sides[side] = _split(params, state, out)
        record = {"step": int(feeds["step"]), "tensors": {}}
        # failures name the step of the check, counted from 1, and the run's own step where they differ
        at = f"step {len(per_step) + 1}" + (f" (training step {record['step']})" if first_step != 1 else "")
        drift = _reference_drift(sides["ref32"], sides["ref64"])
        lost = drift if drift[1] > REFERENCE_HORIZON_RTOL else None
        stretch_drift = max(stretch_drift, drift[1])
        entries = {name: compare_float(sides["backend"][g][name], sides["ref32"][g][name],
                                       None if lost else sides["ref64"][g][name], 0.0, TRAJECTORY_RTOL, stretch_drift)
                   for g in (0, 1) for name in sides["ref32"][g]}
        for name, entry in entries.items():
            record["tensors"][name] = [entry["max_abs"], entry["max_rel"]]

        step_ties = False
        wrong = []
        if "negative_labels" in outs["ref32"]:  # hybrid-image negatives draw no labels in the step
            got, want = outs["backend"]["negative_labels"], outs["ref32"]["negative_labels"]
            wrong = np.flatnonzero(got != want)
        if len(wrong):
            shadow = stepped_from_backend()["negative_labels"]
            margins = ties.margins(before[0], feeds)
            for r in wrong:
                if shadow[r] == got[r]:
                    cause = "trajectory drift: the reference draws the same label from the backend's own weights"
                elif margins[r] <= LABEL_TIE:
                    cause = "sampling tie: the uniform is within fp32 rounding of a CDF boundary"
                    step_ties = True
                else:
                    cause = "mismatch"
                    passed = False
                    first_failure = first_failure or (
                        f"{at}: negative label of row {int(r)} is {int(got[r])}, the reference "
                        f"draws {int(want[r])} (CDF margin {float(margins[r]):.1e}, not a sampling tie)")
                label_events.append({"step": record["step"], "row": int(r), "reference": int(want[r]),
                                     "backend": int(got[r]), "cdf_margin": float(margins[r]), "cause": cause})
            record["negative_label_mismatches"] = len(wrong)

        strict_here = all(e["max_abs"] <= e["tolerance"] for e in entries.values())
        amplified = None
        # only while the backend has kept to the reference: after a failed step its state is off by
        # more than rounding, and the reference stepped from it would "explain" any later step
        if passed and not (step_ties or lost) and not all(e["passed"] for e in entries.values()):
            amplified = _amplified_step(reference, params, state, backend_in, stepped_from_backend(),
                                        sides["backend"], entries)
            record["own_state_check"] = amplified
        if step_ties or (lost and not strict_here) or (amplified and amplified["explained"]):
            why = ("a negative label drawn differently on a sampling tie" if step_ties else
                   f"the fp32 reference is {lost[1]:.1e} (rel) from float64 in {lost[0]}" if lost else
                   amplified["cause"])
            resyncs.append({"step": record["step"], "cause": why})
            record["judged"] = False
            sides["backend"] = sides["ref32"]
        else:
            record["judged"] = True
            for name, entry in entries.items():
                worst[name] = max(worst.get(name, 0.0), entry["max_rel"])
                if "float64" in entry:
                    if strict:
                        first_beyond = record["step"]
                    strict = False
                    record.setdefault("float64_floor", {})[name] = {**entry["float64"], "passed": entry["passed"]}
                passed &= entry["passed"]
                if not entry["passed"] and first_failure is None:
                    first_failure = _tensor_failure(at, name, entry)
        if lost:
            # Both restart: a backend left at its own distance from a float64 side that restarted
            # would be held to the floor of a trajectory shorter than its own.
            sides["ref64"] = sides["backend"] = sides["ref32"]
            stretch_drift = 0.0
            if record["judged"]:
                resyncs.append({"step": record["step"], "cause": f"the fp32 reference is {lost[1]:.1e} (rel) from "
                                f"float64 in {lost[0]} (step judged: the backend was within {TRAJECTORY_RTOL:g})"})
        per_step.append(record)
        if advance is not None:
            advance()
    judged = sum(r["judged"] for r in per_step)
    why_failed = None
    if judged < MIN_JUDGED_FRACTION * steps:
        passed = False
        why_failed = (f"only {judged} of {steps} steps could be judged (at least {MIN_JUDGED_FRACTION:.0%}): "
                      f"too few to establish parity")
    if not passed:
        why_failed = "; ".join(w for w in (first_failure, why_failed) if w) or "failed (no cause recorded)"
    return {"steps": steps, "judged_steps": judged, "first_step": first_step, "passed": bool(passed),
            "within_strict_tolerance": bool(strict), "first_step_beyond_strict_tolerance": first_beyond,
            "resyncs": resyncs, "why_failed": why_failed, "worst_rel": worst,
            "negative_label_events": label_events, "columns": ["max_abs", "max_rel"],
            "per_step": per_step}


def _tensor_failure(at: str, name: str, entry: dict) -> str:
    """Why a tensor failed a judged step (``at``), in one line."""
    text = (f"{at}: {name} is {entry['max_abs']:.2e} from the fp32 reference (rel {entry['max_rel']:.1e}), "
            f"tolerance {entry['tolerance']:.2e}")
    if "float64" in entry:
        f64 = entry["float64"]
        text += (f"; {f64['max_abs_vs_float64']:.2e} from float64 where the fp32 reference is "
                 f"{f64['reference_max_abs_vs_float64']:.2e} (floor {f64['tolerance']:.2e})")
    return text


def _amplified_step(reference: Reference, params: dict, state: dict, backend_feeds: dict, own32: dict,
                    backend: tuple[dict, dict], entries: dict) -> dict:
    """Whether the backend's departure at this step is the reference's own response to the
    backend's state: the reference stepped from the backend's inputs lands within the program
    tolerance of the backend (it computed the step right), and every departing tensor's gap to
    the reference trajectory is at least ``1 / OWN_STATE_SHARE`` times that step's own error.
    ``own32``: the fp32 reference's outputs from ``backend_feeds``."""
    own = _split(params, state, own32)
    own64 = _split(params, state, reference.run64(backend_feeds))
    local = {name: compare_float(backend[g][name], own[g][name], own64[g][name], PROGRAM_ATOL, PROGRAM_RTOL)
             for g in (0, 1) for name in own[g]}
    departing = [name for name, e in entries.items() if not e["passed"]]
    explained = (all(e["passed"] for e in local.values())
                 and all(local[n]["max_abs"] <= OWN_STATE_SHARE * entries[n]["max_abs"] for n in departing))
    worst = max(departing, key=lambda n: entries[n]["max_rel"])
    return {"explained": explained, "departing": {n: {"gap_to_reference": entries[n]["max_abs"],
                                                      "own_step_error": local[n]["max_abs"]} for n in departing},
            "cause": f"the reference stepped from the backend's state lands {local[worst]['max_abs']:.1e} from the "
                     f"backend in {worst}, which is {entries[worst]['max_abs']:.1e} from the reference trajectory: "
                     f"this step amplifies the difference between the two states"}


def _reference_drift(ref32: tuple[dict, dict], ref64: tuple[dict, dict]) -> tuple[str, float]:
    """The tensor where the fp32 reference is relatively farthest from float64, and how far."""
    drift = {name: _max_abs(ref32[g][name], ref64[g][name]) / max(_max(ref64[g][name]), 1e-30)
             for g in (0, 1) for name in ref32[g]}
    return max(drift.items(), key=lambda kv: kv[1])


@contextlib.contextmanager
def _one_torch_thread():
    """The reference runs one small primitive at a time; waking a second thread per op costs more
    than it saves (25x slower matmuls measured on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def verify(model: Model, target: dict, runners: dict, params: dict, state: dict, step: int, x, y,
           infer_batch: int, steps: int = 100, seed: int | None = None, data: str = "", progress: bool = False,
           log=None) -> dict:
    """The full parity report for the compiled ``runners`` (program name -> object with ``run``)."""
    with _one_torch_thread():
        return _verify(model, target, runners, params, state, step, x, y, infer_batch, steps, seed, data, progress, log)


@dataclass
class CheckPlan:
    """The inputs of every check, drawn before anything runs, so that the programs can run
    elsewhere (e.g. on an emulated device) and be compared afterwards with :func:`run_checks`."""

    references: dict  # program name -> Reference
    ties: "_LabelTies | None"
    params: dict  # the weights the checks start from (after any warm-up)
    state: dict
    warmup: dict | None
    cases: list  # (program name, "random" | "real", feeds) in the order they are checked
    trajectory_feeds: Iterator  # the training loop's step feeds, endless
    batch: int
    infer_batch: int

    def take_trajectory(self, steps: int) -> list[dict]:
        """The first ``steps`` trajectory feeds (only the train step's inputs), kept for the check."""
        needed = {v.name for v in self.references["train_step"].f32.program.inputs}
        feeds = [next(self.trajectory_feeds) for _ in range(steps)]
        self.trajectory_feeds = iter(feeds)
        return [{k: v for k, v in f.items() if k in needed} for f in feeds]


def plan_checks(model: Model, names, params: dict, state: dict, step: int, x, y, infer_batch: int,
                seed: int | None = None) -> CheckPlan:
    seed = model.training.seed if seed is None else seed
    batch = model.training.batch_size
    rng = np.random.default_rng([seed, 1234])
    ties = _LabelTies(model, batch) if "train_step" in names else None
    references = {name: Reference(model, name, batch if is_train_program(name) else infer_batch) for name in names}
    feeds_iter = _batches(model, x, y, seed, step + 1)
    params, state, warmup = _warm_up(model, references.get("train_step"), params, state, step, feeds_iter)
    real = next(feeds_iter)
    cases = []
    for name in names:
        inputs = references[name].f32.program.inputs
        for kind in ("random", "real"):
            if kind == "random":
                feeds = random_feeds(model, inputs, params, state, rng)
            elif is_train_program(name):
                feeds = {v.name: {**params, **state, **real}[v.name] for v in inputs}
            elif len(x) >= infer_batch:
                feeds = {v.name: {**params, "x": x[:infer_batch]}[v.name] for v in inputs}
            else:
                continue
            cases.append((name, kind, feeds))
    return CheckPlan(references, ties, params, state, warmup, cases, _chain([real], feeds_iter), batch, infer_batch)


def run_checks(model: Model, target: dict, plan: CheckPlan, run_case, train_run, steps: int, data: str = "",
               progress: bool = False, log=None, started: float | None = None) -> dict:
    """Compare the outputs of every planned case (``run_case(index, name, feeds) -> outputs``) and a
    ``steps``-step trajectory (``train_run(feeds) -> outputs``, None: no trajectory) with the reference."""
    started = time.perf_counter() if started is None else started
    results = []
    with Phase(f"parity: {len(plan.cases)} program checks", progress, log, total=len(plan.cases)) as phase:
        for index, (name, kind, feeds) in enumerate(plan.cases):
            ref = plan.references[name]
            out = run_case(index, name, feeds)
            entry = compare_program(name, out, ref.run32(feeds), ref.run64(feeds), plan.ties,
                                    {k: feeds[k] for k in plan.params if k in feeds}, feeds)
            entry["inputs"] = kind
            results.append(entry)
            phase.advance()
    trajectory = None
    if steps > 0 and train_run is not None:
        with Phase(f"parity: {steps}-step training trajectory", progress, log, total=steps) as phase:
            trajectory = trajectory_parity(train_run, plan.references["train_step"], plan.ties, plan.params,
                                           plan.state, plan.trajectory_feeds, steps, phase.advance)
    passed = all(r["passed"] for r in results) and (trajectory is None or trajectory["passed"])
    return {
        "format": FORMAT, "passed": bool(passed), "model": model.name, "target": target.get("name"),
        "backend": target.get("backend"), "device": target.get("device"), "data": data,
        "batch": {"train": plan.batch, "infer": plan.infer_batch}, "tolerances": TOLERANCES, "warmup": plan.warmup,
        "summary": summarize(results, trajectory), "programs": results, "trajectory": trajectory,
        "seconds": round(time.perf_counter() - started, 2),
    }


def _verify(model, target, runners, params, state, step, x, y, infer_batch, steps, seed, data, progress, log) -> dict:
    started = time.perf_counter()
    plan = plan_checks(model, list(runners), params, state, step, x, y, infer_batch, seed)
    train_run = runners["train_step"].run if "train_step" in runners else None
    return run_checks(model, target, plan, lambda _i, name, feeds: runners[name].run(feeds), train_run, steps, data,
                      progress, log, started)


def summarize(results: list[dict], trajectory: dict | None) -> dict:
    out = {"programs": {}}
    for r in results:
        worst = max(r["tensors"].items(), key=lambda kv: kv[1]["max_rel"], default=(None, {"max_rel": 0.0, "max_abs": 0.0}))
        floor = sorted(k for k, v in r["tensors"].items() if "float64" in v)
        out["programs"][f"{r['program']}/{r['inputs']}"] = {
            "passed": r["passed"], "worst_tensor": worst[0], "max_rel": worst[1]["max_rel"], "max_abs": worst[1]["max_abs"],
            "max_abs_all": max((v["max_abs"] for v in r["tensors"].values()), default=0.0),
            "passed_by_float64_floor": floor,
            "integer_mismatches": {k: len(v) for k, v in r["integer_mismatches"].items()}}
    if trajectory is not None:
        worst = max(trajectory["worst_rel"].items(), key=lambda kv: kv[1], default=(None, 0.0))
        out["trajectory"] = {"passed": trajectory["passed"], "steps": trajectory["steps"],
                             "judged_steps": trajectory["judged_steps"], "resyncs": trajectory["resyncs"],
                             "why_failed": trajectory["why_failed"],
                             "within_strict_tolerance": trajectory["within_strict_tolerance"],
                             "first_step_beyond_strict_tolerance": trajectory["first_step_beyond_strict_tolerance"],
                             "worst_tensor": worst[0], "max_rel": worst[1],
                             "negative_label_events": len(trajectory["negative_label_events"])}
    return out


def _short(x: float) -> str:
    return f"{x:.0e}".replace("e-0", "e-")  # 1e-4, not 0.0001 or 1e-04


# Why a trajectory restarted, in plain words, by the start of its recorded cause.
_RESTARTS = {
    "the fp32 reference is": f"fp32 rounding had carried the reference itself more than {_short(REFERENCE_HORIZON_RTOL)} "
                             "(relative) from a float64 run of the same steps, so fp32 no longer pins down one right "
                             "answer",
    "a negative label": "a negative label was drawn differently because its random number fell within fp32 rounding "
                        "of a boundary",
    "the reference stepped": "the step magnified a rounding-sized difference between the two runs' weights (the "
                             "reference, stepped from the compiled run's own weights, agrees with it)",
}


def summary_lines(report: dict) -> list[str]:
    """The report for people: one line per program check, then the training trajectory in plain
    words, its steps counted from 1 (the check's first step)."""
    lines = [f"parity {'PASSED' if report['passed'] else 'FAILED'}: {report['model']} on {report['target']} "
             f"({report['backend']}, {report['device']})"]
    for key, s in report["summary"]["programs"].items():
        extra = ""
        if s["passed_by_float64_floor"]:
            extra += f"; no farther from float64 than the fp32 reference: {', '.join(s['passed_by_float64_floor'])}"
        if any(s["integer_mismatches"].values()):
            extra += "; integer outputs differing: " + ", ".join(
                f"{name} in {rows} rows" for name, rows in s["integer_mismatches"].items() if rows)
        lines.append(f"  {key:28s} {'ok  ' if s['passed'] else 'FAIL'} max rel {s['max_rel']:.2e} ({s['worst_tensor']}), "
                     f"max abs {s['max_abs_all']:.2e}{extra}")
    t = report["summary"].get("trajectory")
    if t:
        lines += _trajectory_lines(t, (report.get("trajectory") or t).get("first_step") or 1)
    elif report.get("skipped"):
        lines.append(f"  skipped: {report['skipped']}")
    if report.get("reduced_precision"):
        from .fake_quant import reduced_lines

        lines += reduced_lines(report["reduced_precision"])
    return lines


def _trajectory_lines(t: dict, first_step: int) -> list[str]:
    n, beyond = t["steps"], t["first_step_beyond_strict_tolerance"]
    if beyond is None:
        agree = f"every compared step within {_short(TRAJECTORY_RTOL)} (relative) of the reference"
    else:
        k = beyond - first_step + 1
        agree = ((f"step{'s 1-' if k > 2 else ' '}{k - 1} within {_short(TRAJECTORY_RTOL)} (relative) of the reference; "
                  if k > 1 else "") + f"from step {k} some tensors differed from it by more"
                 + (f", but were no farther from a float64 run than the fp32 reference is (within "
                    f"{FLOAT64_FACTOR:g}x): rounding, not an error" if t["passed"] else ""))
    lines = [f"  {f'training, {n} steps':28s} {'ok  ' if t['passed'] else 'FAIL'} max rel {t['max_rel']:.2e} "
             f"({t['worst_tensor']})",
             f"    the compiled train_step and the PyTorch fp32 reference trained from the same weights and batches, "
             f"each feeding its own results back: {agree}"]
    for prefix, why in _RESTARTS.items():
        at = [r["step"] - first_step + 1 for r in t.get("resyncs") or () if r["cause"].startswith(prefix)]
        if at:
            steps = ", ".join(map(str, at[:8])) + (", ..." if len(at) > 8 else "")
            lines.append(f"    {f'{len(at)} times (steps' if len(at) > 1 else 'once (step'} {steps}) the runs were "
                         f"restarted from the same weights: {why}")
    if t["judged_steps"] < n:
        lines.append(f"    {t['judged_steps']} of {n} steps compared (a step that needed a restart is not; at least "
                     f"{MIN_JUDGED_FRACTION:.0%} must be)")
    if t["negative_label_events"]:
        lines.append(f"    {t['negative_label_events']} negative label(s) drawn differently from the reference (each "
                     f"with its cause in the report's trajectory.negative_label_events)")
    if t.get("why_failed"):
        lines.append(f"    {t['why_failed']}")
    return lines
