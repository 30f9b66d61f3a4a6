"""The device side of an emulated (or remote) parity check; runs with only the torch-free runtime.

    python -m ffcompile.runtime.device_check BUNDLE INPUTS.npz OUT.npz

``INPUTS.npz`` (written by ``ffcompile.emulation.verify``, no pickles) holds

* ``case<i>/<input>``: the feeds of check ``i`` (a program on random or real inputs);
* ``start/<tensor>``: the parameters and optimizer state the trajectory starts from;
* ``step<j>/<input>``: the data feeds of training step ``j`` (batch, labels, uniforms, lr, step);
* ``rows<i>/x``: batches of real rows for the bundle's reduced-precision programs.

The bundle is loaded with ``load_bundle`` (checksums, architecture), each case is run through its
compiled program, each reduced-precision program on every ``rows<i>`` batch, then ``train_step``
runs the trajectory feeding its own new parameters and state back, as fine-tuning does.
``OUT.npz`` gets ``case<i>/<output>``, ``<program>.<dtype>.rows<i>/<output>`` and
``step<j>/<output>``, and ``OUT.npz.json`` the device's description, timings and costs: the
process's peak resident memory and its C heap in use after loading, after inference and after
fine-tuning, and the
calls that ``count_calls`` brackets with instruction-count marks.
Progress goes to stderr, as lines ``PROGRESS phase N LABEL`` (a phase of N items begins) and
``PROGRESS advance`` (one item done).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from typing import Callable
from pathlib import Path

import numpy as np

from .bundle import load_bundle
from .machine import heap_in_use_bytes, peak_rss_kib

PROGRESS = "ffcompile-device-progress:"


def _progress(what: str) -> None:
    print(PROGRESS, what, file=sys.stderr, flush=True)


def _grouped(archive) -> dict[str, dict[str, np.ndarray]]:
    groups: dict[str, dict[str, np.ndarray]] = {}
    for key in archive.files:
        group, name = key.split("/", 1)
        groups.setdefault(group, {})[name] = archive[key]
    return groups


MARK_FD = -7919  # closing this invalid descriptor is how the guest marks the instruction count (insn_count.c)
MARKED_CALLS = 2  # calls of each program between two marks


def mark() -> None:
    try:
        os.close(MARK_FD)
    except OSError:
        pass


def count_calls(calls: list[tuple[str, int, Callable]]) -> list[dict]:
    """For each (program, rows, call): one warm-up call, then MARKED_CALLS calls between two
    marks. An instruction counter attached to the process turns the marks into counts."""
    out = []
    for program, rows, call in calls:
        call()
        mark()
        for _ in range(MARKED_CALLS):
            call()
        mark()
        out.append({"program": program, "rows": rows, "calls": MARKED_CALLS})
        _progress("advance")
    return out


def _cost_calls(bundle, groups: dict, current: dict) -> list[tuple[str, int, Callable]]:
    """The calls whose instructions are counted: every inference program at the bundle's
    inference batch (reduced ones also at one row) and one train step."""
    batch = next((g["x"] for k, g in sorted(groups.items()) if k.startswith("rows")), None)
    calls = []
    if batch is not None:
        for name, program in bundle.programs.items():
            if name.startswith("infer_"):
                feeds = {**bundle.program_params(name), "x": batch}
                calls.append((name, len(batch), lambda p=program, f=feeds: p.run(f)))
        for name, program in bundle.reduced.items():
            for rows in (len(batch), 1):
                calls.append((f"{name}.{bundle.dtype}", rows, lambda p=program, x=batch[:rows]: p.run({"x": x})))
    step = next((g for k, g in sorted(groups.items()) if k.startswith("step")), None)
    if step is not None and current:
        calls.append(("train_step", len(step["x"]), lambda: bundle.programs["train_step"].run({**current, **step})))
    return calls


def run_device_check(bundle_dir, inputs_path, out_path) -> dict:
    started = time.perf_counter()
    bundle = load_bundle(bundle_dir)
    loaded = time.perf_counter()
    rss = {"after_load": peak_rss_kib()}
    heap = {"after_load": heap_in_use_bytes()}
    with np.load(inputs_path, allow_pickle=False) as archive:
        groups = _grouped(archive)
    out: dict[str, np.ndarray] = {}
    case_ms = []
    cases = sorted((k for k in groups if k.startswith("case")), key=lambda k: int(k[4:]))
    _progress(f"phase {len(cases)} {len(cases)} program checks")
    for key in cases:
        name = str(groups[key].pop("__program__"))
        t = time.perf_counter()
        result = bundle.programs[name].run(groups[key])
        case_ms.append({"case": key, "program": name, "ms": (time.perf_counter() - t) * 1e3})
        out.update({f"{key}/{k}": np.asarray(v) for k, v in result.items()})
        _progress("advance")
    batches = sorted((k for k in groups if k.startswith("rows")), key=lambda k: int(k[4:])) if bundle.reduced else []
    if batches:
        _progress(f"phase {len(batches)} {len(batches)} batches in {bundle.dtype}")
    for key in batches:
        _progress("advance")
        for name, program in bundle.reduced.items():
            result = program.run({"x": groups[key]["x"]})
            out.update({f"{name}.{bundle.dtype}.{key}/{k}": np.asarray(v) for k, v in result.items()})
    rss["after_inference"] = peak_rss_kib()
    heap["after_inference"] = heap_in_use_bytes()
    steps = sorted((k for k in groups if k.startswith("step")), key=lambda k: int(k[4:]))
    if steps:
        _progress(f"phase {len(steps)} {len(steps)} training steps")
    current = dict(groups.get("start", {}))
    step_ms = []
    for key in steps:
        t = time.perf_counter()
        result = bundle.programs["train_step"].run({**current, **groups[key]})
        step_ms.append((time.perf_counter() - t) * 1e3)
        current = {k: np.array(result[f"new.{k}"]) for k in current}  # own outputs fed back
        out.update({f"{key}/{k}": np.asarray(v) for k, v in result.items()})
        _progress("advance")
    rss["after_finetuning"] = peak_rss_kib()
    heap["after_finetuning"] = heap_in_use_bytes()
    calls = _cost_calls(bundle, groups, dict(groups.get("start", {})))
    _progress(f"phase {len(calls)} {len(calls)} program calls with instruction counts")
    counted = count_calls(calls)
    np.savez(out_path, **out)
    info = {"machine": platform.machine(), "python": platform.python_version(), "numpy": np.__version__,
            "peak_rss_kib": rss, "heap_bytes": heap, "counted_calls": counted, "backend": bundle.target["backend"], "target": bundle.target["name"], "cases": case_ms,
            "steps": len(steps), "step_ms": step_ms,
            "step_ms_median": statistics.median(step_ms) if step_ms else None,
            "load_s": loaded - started, "total_s": time.perf_counter() - started}
    Path(f"{out_path}.json").write_text(json.dumps(info, indent=1))
    return info


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3:
        print("usage: python -m ffcompile.runtime.device_check BUNDLE INPUTS.npz OUT.npz", file=sys.stderr)
        return 2
    from ..core.errors import FFCompileError

    try:
        info = run_device_check(*argv)
    except FFCompileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({k: info[k] for k in ("machine", "target", "steps", "step_ms_median", "total_s")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
