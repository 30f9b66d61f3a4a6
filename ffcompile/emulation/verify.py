"""Parity of an aarch64 bundle checked on an emulated device (qemu-aarch64 + a cached sysroot).

The host draws every input exactly as ``ffcompile verify`` does (``parity.plan_checks``: programs
on random and real data, and the training loop's feeds for a k-step trajectory), writes them to an
npz, and runs ``ffcompile.runtime.device_check`` under qemu with *only* the bundle, the torch-free
runtime (the repository's ``ffcompile`` package on the guest's PYTHONPATH) and the device wheels
(numpy, onnxruntime, TVM runtime, safetensors, tqdm) - no torch. The device runs each program and
a k-step fine-tuning trajectory from the bundle's weights, feeding its own outputs back, and
writes every output to an npz (no pickles). The host then compares them with the PyTorch
reference using ``parity.run_checks`` - the same comparisons and tolerances as ``verify``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from ..contract.manifest import OPTIMIZER, WEIGHTS, read_manifest, verify_files
from ..contract.weights import check_tensors, read_tensors
from ..core.errors import FFCompileError
from ..core.spec import model_from_dict
from ..loop.progress import Phase
from ..runtime.device_check import PROGRESS

REPO_PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding the ffcompile package
DEFAULT_STEPS = 10
GUEST_TIMEOUT_S = 1800
REDUCED_ROWS = 500  # validation rows the device runs through each reduced-precision program
# The emulated device: a Raspberry Pi 4's core (ARMv8.0-A with NEON; no SVE, no dot-product
# instructions), not qemu's default "max" CPU, whose extensions the libraries would use.
DEVICE_CPU = "cortex-a72"
# The guest runs single-threaded, with a fixed hash seed, so that its instruction counts repeat.
GUEST_ENV = {"FFCOMPILE_ORT_THREADS": "1", "TVM_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _read_bundle(root: Path, trust=None, digest: str | None = None):
    manifest = read_manifest(root, trust, digest)
    verify_files(root, manifest)
    model = model_from_dict(manifest["model"], source=f"{root / 'manifest.json'} (model)")
    params, _ = read_tensors(root / WEIGHTS)
    state, meta = read_tensors(root / OPTIMIZER)
    check_tensors(f"bundle {root}", model, params, state)
    return manifest, model, params, state, int(meta.get("step", 0))


def _write_inputs(path: Path, plan, trajectory: list[dict], rows: list[np.ndarray]) -> None:
    arrays = {f"rows{i}/x": batch for i, batch in enumerate(rows)}
    for i, (name, _kind, feeds) in enumerate(plan.cases):
        arrays[f"case{i}/__program__"] = np.array(name)
        arrays.update({f"case{i}/{k}": np.asarray(v) for k, v in feeds.items()})
    if trajectory:
        arrays.update({f"start/{k}": np.asarray(v) for k, v in {**plan.params, **plan.state}.items()})
    for j, feeds in enumerate(trajectory):
        arrays.update({f"step{j}/{k}": np.asarray(v) for k, v in feeds.items()})
    np.savez(path, **arrays)


def _outputs(path: Path) -> dict[str, dict[str, np.ndarray]]:
    groups: dict[str, dict[str, np.ndarray]] = {}
    with np.load(path, allow_pickle=False) as archive:
        for key in archive.files:
            group, name = key.split("/", 1)
            groups.setdefault(group, {})[name] = archive[key]
    return groups


class _DevicePhases:
    """The device check's progress lines (``device_check.PROGRESS``) as phases here; the first
    phase, until the device reports its checks, is starting Python and loading the bundle."""

    def __init__(self, arch: str, progress: bool, log):
        self.where, self.progress, self.log = f"emulated {arch}", progress, log
        self.phase = Phase(f"{self.where}: start Python, load the runtime and the bundle", progress, log)

    def __call__(self, line: str) -> None:
        if not line.startswith(PROGRESS):
            return
        what = line[len(PROGRESS):].split(maxsplit=2)
        if what[0] == "advance":
            self.phase.advance()
        elif what[0] == "phase":
            self.phase.close()
            self.phase = Phase(f"{self.where}: {what[2]}", self.progress, self.log, int(what[1]))

    def __enter__(self) -> _DevicePhases:
        return self

    def __exit__(self, *exc) -> None:
        self.phase.__exit__(*exc)


def verify_emulated(bundle_dir, data_dir=None, steps: int = DEFAULT_STEPS, cache_dir=None, progress: bool = True,
                    log=print, keep_dir=None, trust=None, digest: str | None = None) -> dict:
    """The parity report (as ``ffcompile verify``) of an aarch64 bundle run under qemu; adds an
    ``emulated`` section (device, sysroot, timings). ``keep_dir``: keep the exchanged npz files there.
    ``trust``/``digest``: as ``load_bundle``."""
    from . import qemu as emulation
    from ..data.datasets import load_model_split
    from ..reference.fake_quant import check_reduced_section, padded_batches
    from ..reference.parity import plan_checks, run_checks
    from .insn_count import counter_plugin, counts_between_marks, plugin_args

    started = time.perf_counter()
    root = Path(bundle_dir)
    if steps < 0:
        raise FFCompileError(f"--steps must be >= 0, got {steps}")
    manifest, model, params, state, step = _read_bundle(root, trust, digest)
    target = manifest["target"]
    if target.get("arch") != "aarch64" or target.get("device") != "cpu":
        raise FFCompileError(f"bundle {root}: --emulate runs aarch64 CPU bundles under qemu-aarch64; this bundle is for "
                             f"target {target.get('name')!r} ({target.get('arch')}, {target.get('device')})")
    emulation.check_host_tools("aarch64")  # qemu-user + gcc-aarch64-linux-gnu, named in the error
    sysroot = emulation.ensure_sysroot("aarch64", cache_dir=cache_dir, progress=progress)

    source, x, y = load_model_split(model, data_dir, "train")
    names = list(manifest["programs"])
    infer_batch = manifest["batch"]["infer"]
    plan = plan_checks(model, names, params, state, step, x, y, infer_batch)
    trajectory = plan.take_trajectory(steps) if steps > 0 and "train_step" in names else []
    reduced = manifest.get("reduced_precision")
    _, x_val, y_val = load_model_split(model, data_dir, "val")
    x_val, y_val = x_val[:REDUCED_ROWS if reduced else infer_batch], y_val[:REDUCED_ROWS if reduced else infer_batch]
    rows = [padded for _, _, padded in padded_batches(x_val, infer_batch)]

    work = Path(keep_dir) if keep_dir is not None else Path(tempfile.mkdtemp(prefix="ffcompile-emulate-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        inputs, outputs = work / "device_inputs.npz", work / "device_outputs.npz"
        _write_inputs(inputs, plan, trajectory, rows)
        counts = work / "instructions.txt"
        qemu_args = ["-cpu", DEVICE_CPU, *plugin_args(counter_plugin(sysroot.root.parent), counts)]
        log(f"running {len(plan.cases)} program checks and a {len(trajectory)}-step fine-tuning trajectory on "
            f"emulated aarch64 ({target['backend']}; qemu is slow: expect a minute or more)")
        t = time.perf_counter()
        with _DevicePhases(target["arch"], progress, log) as phases:
            proc = sysroot.run([sysroot.python, "-m", "ffcompile.runtime.device_check", root.resolve(), inputs,
                                outputs], env={"PYTHONPATH": str(REPO_PACKAGE_ROOT), "PYTHONDONTWRITEBYTECODE": "1",
                                                  **GUEST_ENV},
                               timeout=GUEST_TIMEOUT_S, echo=phases, qemu_args=qemu_args)
        guest_s = time.perf_counter() - t
        device = json.loads(Path(f"{outputs}.json").read_text())
        groups = _outputs(outputs)
        instructions = counts_between_marks(counts, device["counted_calls"])
    finally:
        if keep_dir is None:
            shutil.rmtree(work, ignore_errors=True)

    replay = iter(groups[f"step{j}"] for j in range(len(trajectory)))
    report = run_checks(model, target, plan, lambda i, _name, _feeds: groups[f"case{i}"],
                        (lambda _feeds: next(replay)) if trajectory else None, len(trajectory),
                        data=source.describe(), progress=progress, log=log, started=started)
    report["bundle"] = str(bundle_dir)
    report["emulated"] = {
        "device": f"{device['machine']} ({DEVICE_CPU}) under {Path(emulation.qemu_program('aarch64')).name} "
                  "(user-mode emulation)",
        "runs": "ffcompile.runtime.device_check with only the bundle and the torch-free runtime",
        "sysroot": str(sysroot.root.parent), "device_python": device["python"], "device_numpy": device["numpy"],
        "guest_seconds": round(guest_s, 1), "bundle_load_s": round(device["load_s"], 2),
        "train_step_ms_median": device["step_ms_median"], "train_step_ms": device["step_ms"],
        "program_ms": device["cases"], "guest_stdout": [line for line in proc.stdout.strip().splitlines()
                                                          if not line.startswith(PROGRESS)][-1:],
        "cost": device_cost(root, manifest, device["peak_rss_kib"], device["heap_bytes"], instructions),
    }
    if reduced:
        report["reduced_precision"] = {
            **check_reduced_section(model, reduced, root, params, x_val, y_val, infer_batch,
                                    lambda name, i, _xb: groups[f"{name}.{reduced['dtype']}.rows{i}"]),
            "data": f"first {len(x_val)} validation rows", "ran_on": "the emulated device"}
        report["passed"] = report["passed"] and report["reduced_precision"]["passed"]
    return report


def device_cost(root: Path, manifest: dict, rss_kib: dict, heap: dict, instructions: list[dict]) -> dict:
    """What the emulated device paid: the bundle's size, the peak resident memory of the process,
    the guest's C heap in use, and the instructions of each program call (see ``insn_count``)."""
    from ..runtime.bundle import bundle_bytes

    return {"bundle_bytes": bundle_bytes(root, manifest),
            "peak_rss_mib": {phase: round(kib / 1024, 1) for phase, kib in rss_kib.items()},
            "peak_rss_note": "of the qemu-user process: the guest's memory plus the emulator's own (its code "
                             "translation cache), so an upper bound of what the device needs",
            "heap_in_use_mib": {phase: None if b is None else round(b / 2**20, 1) for phase, b in heap.items()},
            "heap_note": "the guest's C heap in use (glibc mallinfo2): arrays, the runtime's buffers and arenas, "
                         "without code and mapped files, so a lower bound of what the device needs",
            "instructions": instructions,
            "instructions_note": "aarch64 instructions executed by the guest, counted by a qemu plugin with one "
                                 "thread: repeatable to within about 0.1 % between runs, a measure of work, "
                                 "not of time"}
