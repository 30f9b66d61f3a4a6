"""Benchmark (not a test): data-parallel FF training on torch.distributed, 1 vs N processes.

For each process count it launches a torchrun job on this machine (gloo, CPU; each process gets
cores / N torch threads) that runs the data-parallel step (``ffcompile.reference.distributed``)
on random images, and times its three parts on every step: ``train_gradients`` on the shard,
the all-reduce of the gradients, ``train_apply``. The JSON has the medians, the all-reduce
payload, the throughput, and a projection to more devices from that split:

    step(N) = gradients(1) / N + apply + all-reduce(N),   all-reduce(N) = 2 (N - 1) / N * bytes / bandwidth

(the ring all-reduce's traffic per device), with the measured gradients and apply times divided
by a device speed-up the caller states (``--speedup``: how much faster one target device runs
the same programs than this machine's CPU) and a link bandwidth (``--bandwidth-gbs``).

    python bench/bench_distributed.py --model models/mnist-supervised.toml --procs 1,2 --steps 10 --out dist.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def worker(args) -> None:
    """One process of the job: times the step's parts, rank 0 writes them to args.part."""
    import numpy as np
    import torch

    sys.path.insert(0, str(REPO))
    from ffcompile.core.spec import load_model
    from ffcompile.lowering import init_state
    from ffcompile.reference import distributed

    rank, world = distributed.start("cpu")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    model = load_model(args.model)
    step = distributed.DataParallelStep(model, "cpu", rank, world)
    params, state = (step.to_device(d) for d in init_state(model, 0))
    rng = np.random.default_rng(0)
    batch = model.training.batch_size
    feeds = {"x": rng.random((batch, model.input.size), dtype=np.float32), "y": rng.integers(0, 10, batch),
             "u": rng.random(batch, dtype=np.float32), "lr": np.float32(1e-3), "step": np.float32(1)}
    times = {"gradients": [], "all_reduce": [], "apply": []}
    shard = step.to_device({k: feeds[k][step.rows] for k in step.feed_names})
    schedule = step.to_device({k: feeds[k] for k in step.schedule_names})
    for _ in range(args.steps):
        t0 = time.perf_counter()
        with torch.no_grad():
            out = step.gradients.run({**params, **shard})
        t1 = time.perf_counter()
        summed = distributed.all_reduce_sum({k: out[k] for k in step.reduced})
        t2 = time.perf_counter()
        with torch.no_grad():
            step.apply.run({**params, **state, **summed, **schedule})
        t3 = time.perf_counter()
        for key, seconds in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
            times[key].append(seconds)
    if rank == 0:
        payload = sum(out[k].numel() * out[k].element_size() for k in step.reduced)
        Path(args.part).write_text(json.dumps({"times": times, "payload_bytes": payload, "threads": torch.get_num_threads()}))
    distributed.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO / "models" / "mnist-supervised.toml")
    ap.add_argument("--procs", default="1,2", help="process counts to measure")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--project", default="8", help="device counts to project to")
    ap.add_argument("--speedup", type=float, default=1.0, help="target device speed / this CPU's, for the projection")
    ap.add_argument("--bandwidth-gbs", type=float, default=None,
                    help="link bandwidth for the projection (default: the all-reduce bandwidth measured here)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--part", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.part:
        return worker(args)

    sys.path.insert(0, str(REPO))
    from ffcompile.core.spec import load_model

    batch = load_model(args.model).training.batch_size
    load_before = os.getloadavg()
    runs = {}
    for n in map(int, args.procs.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            part = Path(tmp) / "part.json"
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
                       __file__, "--model", str(args.model), "--steps", str(args.steps), "--out", str(args.out),
                       "--part", str(part)]
            subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            measured = json.loads(part.read_text())
        median = {k: statistics.median(v[1:] or v) for k, v in measured["times"].items()}  # the first step warms up
        step_s = sum(median.values())
        runs[n] = {"median_seconds": median, "step_seconds": step_s, "threads_per_process": measured["threads"],
                   "payload_bytes": measured["payload_bytes"], "rows_per_second": round(batch / step_s, 1)}
    base = runs[min(runs)]
    payload = base["payload_bytes"]
    multi = [runs[n] for n in runs if n > 1]
    measured_bw = (2 * (max(runs) - 1) / max(runs) * payload / multi[-1]["median_seconds"]["all_reduce"]) if multi else None
    bandwidth = args.bandwidth_gbs * 1e9 if args.bandwidth_gbs else measured_bw
    grad1 = base["median_seconds"]["gradients"] * min(runs) / args.speedup
    apply = base["median_seconds"]["apply"] / args.speedup
    projection = {}
    for n in map(int, args.project.split(",")):
        comm = 2 * (n - 1) / n * payload / bandwidth if bandwidth else None
        total = grad1 / n + apply + (comm or 0.0)
        projection[n] = {"step_seconds": total, "gradients_seconds": grad1 / n, "apply_seconds": apply,
                         "all_reduce_seconds": comm, "speedup_over_1": (grad1 + apply) / total}
    result = {"benchmark": "data-parallel FF step on torch.distributed (gloo, CPU)", "model": str(args.model),
              "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "cores": os.cpu_count(),
              "load_average_before_after": [load_before, os.getloadavg()], "runs": runs,
              "allreduce_bandwidth_measured_gbs": measured_bw / 1e9 if measured_bw else None,
              "projection": {"assumed_speedup": args.speedup, "bandwidth_gbs": bandwidth / 1e9 if bandwidth else None,
                             "devices": projection}}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({n: {"step_ms": round(r["step_seconds"] * 1e3, 1), "rows_per_second": r["rows_per_second"]}
                      for n, r in runs.items()}))


if __name__ == "__main__":
    main()
