#!/usr/bin/env python
"""Time of one training epoch with ``ffcompile train`` on each backend, interleaved, in fresh processes.

    python bench/bench_train_epoch.py --data-dir DIR_WITH_MNIST --out train_epoch.json
    python bench/bench_train_epoch.py --data-dir DIR --limit 5000 --rounds 2   # reduced, extrapolated

Each run is ``ffcompile train models/mnist-supervised.toml --epochs 1 --limit N --backend B`` with
``--threads`` threads (OMP/MKL/TVM), validating on the held-out 10k images (in the torch reference
for every backend). From its metrics.json: ``seconds`` = the epoch's training loop; the process's
wall time minus that = start-up, compilation + parity check (compiled backends), validation and
plots. With ``--limit`` below 50000 the JSON also gives the training time extrapolated to the full
50k images (steps x median seconds per step), labelled as such.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO / "tools"), str(HERE)]
import bench_ort as B  # noqa: E402  (machine load, cpu info)

FULL = 50000


def one_run(args, backend: str, work: Path) -> dict:
    out = work / f"{backend}-{time.time_ns()}"
    cmd = [sys.executable, "-m", "ffcompile", "train", str(REPO / "models" / "mnist-supervised.toml"), "--epochs", "1",
           "--out", str(out), "--backend", backend, "--no-progress", "--limit", str(args.limit)]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    env = dict(os.environ, PYTHONPATH=str(REPO), **{v: str(args.threads) for v in
                                                   ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TVM_NUM_THREADS")})
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{backend}: {proc.stderr[-1500:]}")
    epoch = json.loads((out / "metrics.json").read_text())["epochs"][0]
    steps = epoch["step"]
    row = {"backend": backend, "wall_s": round(wall, 1), "train_loop_s": epoch["seconds"], "steps": steps,
           "s_per_step": epoch["seconds"] / steps, "other_s": round(wall - epoch["seconds"], 1),
           "val_error": {k: v for k, v in epoch.items() if k.startswith("val_error.")}}
    B.log(f"  {backend}: wall {wall:.0f} s, training loop {epoch['seconds']:.0f} s ({steps} steps)")
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=None, help="MNIST IDX folder (default: ffcompile's own resolution)")
    ap.add_argument("--out", default="train_epoch.json")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit", type=int, default=FULL)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--backends", nargs="+", default=["torch", "tvm"])
    args = ap.parse_args()
    report = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "commit": B.commit(), "machine": B.cpu_info(),
              "threads": args.threads, "limit": args.limit, "load_before": B.machine_load(), "runs": []}
    with tempfile.TemporaryDirectory(prefix="bench-epoch-") as tmp, B.LoadMonitor() as monitor:
        for _ in range(args.rounds):
            for backend in args.backends:
                report["runs"].append(one_run(args, backend, Path(tmp)))
    report["load_during"] = monitor.summary()
    report["load_after"] = B.machine_load()
    report["summary"] = {}
    for backend in args.backends:
        runs = [r for r in report["runs"] if r["backend"] == backend]
        per_step = float(np.median([r["s_per_step"] for r in runs]))
        entry = {"median_train_loop_s": float(np.median([r["train_loop_s"] for r in runs])),
                 "median_s_per_step": per_step, "median_other_s": float(np.median([r["other_s"] for r in runs]))}
        if args.limit < FULL:
            steps = FULL // 100
            entry["extrapolated_full_epoch_train_loop_s"] = per_step * steps
            entry["extrapolated_note"] = (f"EXTRAPOLATED: {steps} steps x the median seconds per step measured on "
                                          f"{args.limit} images; validation etc. ('other') measured as is")
        report["summary"][backend] = entry
    Path(args.out).write_text(json.dumps(report, indent=1))
    B.log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
