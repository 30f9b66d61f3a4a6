"""Kill -9 ``ffcompile train``, ``finetune`` and ``build`` at random points and check that nothing
is lost: every interrupted run, resumed until done, ends bit-identical to an uninterrupted one
with complete metrics; after every killed rebuild the output folder holds a whole, loadable
bundle, and the next build leaves no leftovers.

    python tools/killtest.py --kills 50 --out killtest.json
    python tools/killtest.py --at-renames --out killtest-renames.json     # needs strace

``--at-renames`` kills each command at every one of its renames in turn instead of at random
times: an uninterrupted run is traced to count its rename calls, then for each N the command runs
under ``strace``, which delivers SIGKILL at the N-th rename.

Uses tests/bundle/tiny.toml (2 small layers) on the built-in MNIST subset, so each command takes
seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ffcompile.contract.checkpoint import load_checkpoint  # noqa: E402
from ffcompile.core.errors import FFCompileError  # noqa: E402
from ffcompile.runtime.bundle import load_bundle  # noqa: E402

SPEC = REPO / "tests" / "bundle" / "tiny.toml"  # 2 small layers, Adam, peer normalization


def ffcompile(*args) -> list[str]:
    return [sys.executable, "-m", "ffcompile", *map(str, args)]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def run(cmd) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, env=env())
    return time.perf_counter() - started, result


def run_killed(cmd, after: float) -> bool:
    """Start ``cmd``, SIGKILL its process group after ``after`` seconds; True if it was killed
    (False: it finished first)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env(),
                            start_new_session=True)
    try:
        proc.wait(timeout=after)
        return False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return True


def same_checkpoint(a: Path, b: Path) -> bool:
    x, y = load_checkpoint(a), load_checkpoint(b)
    return (x.epoch, x.step) == (y.epoch, y.step) and all(
        np.array_equal(x.params[k], y.params[k]) for k in x.params) and all(
        np.array_equal(x.state[k], y.state[k]) for k in x.state)


def metrics_rows(run_dir: Path) -> list[dict]:
    rows = json.loads((run_dir / "metrics.json").read_text())["epochs"]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp"))


RENAMES = ("rename", "renameat", "renameat2")


def traced(cmd, kill_at: tuple[str, int] | None = None, log: str = os.devnull) -> list[str]:
    """``cmd`` under strace, tracing the rename calls (into ``log``); with ``kill_at`` = (call, n),
    SIGKILL at that call's n-th invocation (strace counts each call separately)."""
    inject = ["-e", f"inject={kill_at[0]}:signal=SIGKILL:when={kill_at[1]}"] if kill_at else []
    return ["strace", "-f", "-qq", "-o", log, "-e", f"trace={','.join(RENAMES)}", *inject, *cmd]


def rename_points(cmd) -> list[tuple[str, int]]:
    """Every rename an uninterrupted run of ``cmd`` makes, as (call, n-th of that call)."""
    with tempfile.NamedTemporaryFile("r") as log:
        subprocess.run(traced(cmd, log=log.name), capture_output=True, env=env(), check=True)
        calls = [line.split()[1].split("(")[0] for line in log if "rename" in line and "(" in line]
    return [(call, n) for call in RENAMES for n in range(1, calls.count(call) + 1)]


def killed_at(cmd, point: tuple[str, int]) -> bool:
    return subprocess.run(traced(cmd, point), capture_output=True, env=env()).returncode in (-signal.SIGKILL, 128 + 9)


def finish_and_compare(command, out: Path, reference: Path, report: dict, label: str) -> None:
    """Run an interrupted run in ``out`` to its end and count, into ``report``, whether it matches
    the uninterrupted ``reference`` bit for bit, with complete metrics and no leftovers."""
    resume = ["--resume"] if (out / "checkpoint.safetensors").exists() else []
    _, final = run(command(out, resume))
    if final.returncode != 0:
        report["failures"].append(f"{label}: {final.stderr.strip().splitlines()[-1:]}")
        return
    report["bit_identical"] += same_checkpoint(out / "checkpoint.safetensors", reference / "checkpoint.safetensors")
    report["metrics_complete"] += metrics_rows(out) == metrics_rows(reference)
    if leftovers(out):
        report["failures"].append(f"{label}: leftovers {leftovers(out)}")
    shutil.rmtree(out)


def kill_runs_at_renames(name: str, command, reference: Path, work: Path) -> dict:
    """Train-like commands killed at each rename in turn, then resumed to the end."""
    points = rename_points(command(work / f"{name}-count", []))
    report = {"renames": len(points), "kills": 0, "bit_identical": 0, "metrics_complete": 0, "failures": []}
    for i, point in enumerate(points):
        out = work / f"{name}-rename-{i}"
        report["kills"] += killed_at(command(out, []), point)
        finish_and_compare(command, out, reference, report, str(point))
    return report


def kill_builds_at_renames(spec: Path, bundle: Path) -> dict:
    """Rebuilds killed at each rename in turn: a whole bundle must be at -o after every one."""
    cmd = ffcompile("build", spec, "-o", bundle, "--verify-steps", "0", "--no-progress")
    points = rename_points(cmd)
    report = {"renames": len(points), "kills": 0, "bundle_missing_or_broken": 0, "failures": []}
    for point in points:
        report["kills"] += killed_at(cmd, point)
        try:
            load_bundle(bundle)
        except FFCompileError as e:
            report["bundle_missing_or_broken"] += 1
            report["failures"].append(f"{point}: {e}")
    _, final = run(cmd)
    if final.returncode != 0:
        report["failures"].append(f"final build: {final.stderr.strip().splitlines()[-1:]}")
    report["leftovers_after_final_build"] = leftovers(bundle.parent)
    return report


def kill_runs(name: str, command, reference: Path, seconds: float, kills: int, work: Path, rng) -> dict:
    """Train-like commands: each trial kills a run 1 to 3 times at random points (resuming after
    each kill), then lets it finish; the result is compared with the uninterrupted ``reference``."""
    report = {"kills": 0, "trials": 0, "bit_identical": 0, "metrics_complete": 0, "failures": []}
    while report["kills"] < kills:
        out = work / f"{name}-{report['trials']}"
        report["trials"] += 1
        for _ in range(rng.randint(1, 3)):
            resume = ["--resume"] if (out / "checkpoint.safetensors").exists() else []
            report["kills"] += run_killed(command(out, resume), rng.uniform(0.0, seconds))
        finish_and_compare(command, out, reference, report, f"trial {report['trials']}")
    return report


def kill_builds(spec: Path, bundle: Path, seconds: float, kills: int, rng) -> dict:
    report = {"kills": 0, "builds_completed": 0, "bundle_missing_or_broken": 0, "leftovers_after_final_build": [],
              "failures": []}
    seed = 0
    while report["kills"] < kills:
        seed += 1
        cmd = ffcompile("build", spec, "-o", bundle, "--verify-steps", "0", "--no-progress", "--seed", seed)
        if run_killed(cmd, rng.uniform(0.0, seconds)):
            report["kills"] += 1
        else:
            report["builds_completed"] += 1
        try:
            load_bundle(bundle)
        except FFCompileError as e:
            # a killed build may leave the old bundle moved aside: the next build restores it
            report["bundle_missing_or_broken"] += 1
            report["failures"].append(f"after kill {report['kills']}: {e}")
    _, final = run(ffcompile("build", spec, "-o", bundle, "--verify-steps", "0", "--no-progress"))
    if final.returncode != 0:
        report["failures"].append(f"final build: {final.stderr.strip().splitlines()[-1:]}")
    report["leftovers_after_final_build"] = leftovers(bundle.parent)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=50, help="kills per command (default 50)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--limit", type=int, default=200, help="training examples")
    parser.add_argument("--commands", default="train,finetune,build")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="torch", help="train's --backend (default torch: no compile per launch)")
    parser.add_argument("--at-renames", action="store_true", help="kill at every rename in turn (strace)")
    parser.add_argument("--out", type=Path, default=Path("killtest.json"))
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="ffcompile-killtest-"))
    results = {"mode": "at every rename" if args.at_renames else "random points", "kills_per_command": args.kills, "epochs": args.epochs, "limit": args.limit, "commands": {}}
    try:
        spec = SPEC
        common = ["--epochs", args.epochs, "--limit", args.limit, "--no-progress"]
        commands = args.commands.split(",")
        bundle = work / "bundles" / "b"
        seconds, built = run(ffcompile("build", spec, "-o", bundle, "--verify-steps", "0", "--no-progress"))
        assert built.returncode == 0, built.stderr
        trained = {"train": lambda out, resume: ffcompile("train", spec, "--out", out, "--backend", args.backend, *common,
                                                          *resume),
                   "finetune": lambda out, resume: ffcompile("finetune", bundle, "--out", out, *common, *resume)}
        for name, command in trained.items():
            if name not in commands:
                continue
            run_seconds, ref = run(command(work / f"{name}-ref", []))
            assert ref.returncode == 0, ref.stderr
            killed = (kill_runs_at_renames(name, command, work / f"{name}-ref", work) if args.at_renames else
                      kill_runs(name, command, work / f"{name}-ref", run_seconds, args.kills, work, rng))
            results["commands"][name] = {"uninterrupted_seconds": round(run_seconds, 2), **killed}
            print(name, results["commands"][name], flush=True)
            args.out.write_text(json.dumps(results, indent=1) + "\n")  # each command's result as it is done
        if "build" in commands:
            killed = (kill_builds_at_renames(spec, bundle) if args.at_renames else
                      kill_builds(spec, bundle, seconds, args.kills, rng))
            results["commands"]["build"] = {"uninterrupted_seconds": round(seconds, 2), **killed}
            print("build", results["commands"]["build"], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
