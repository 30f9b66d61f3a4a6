#!/usr/bin/env python
"""TVM (x86, our hand-written schedules) vs onnxruntime vs torch eager, side by side in ONE run,
plus the train step's time on an emulated aarch64 device (reported, not a goal).

    python bench/bench_tvm.py                     # writes bench_tvm.json, progress on stderr
    python bench/bench_tvm.py --repeats 5 --out x.json --no-arm

Sections (medians of interleaved samples, A B C A B C ..., helpers shared with bench/bench_ort.py):

- ``train_step``: models/mnist-supervised.toml (784-2000x4), batch 100. Goal: TVM <= ORT.
- ``infer_goodness_b1``: one image, all labels scored in one pass, same network.
- ``train_step_hybrid``, ``train_step_local``: models/mnist-unsupervised.toml (hybrid negatives made
  in the step, mask blur included) and models/mnist-local.toml (locally connected, masked dense),
  batch 100. Reported, not goals.
- ``arm_emulated``: models/mnist-small.toml train_step batch 100 cross-compiled for targets/arm-cpu.toml
  and run under qemu-aarch64 in the cached sysroot (user-mode emulation on this x86 host: says
  nothing about a real Raspberry Pi's speed).

Machine load is recorded before and after: compare numbers only within one run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
warnings.filterwarnings("ignore", category=UserWarning)  # the ONNX importer renames dotted names

import bench_ort as B  # noqa: E402  (its timing, peak and program helpers)

log = B.log


def tvm_runner(prog, target: dict, work: Path):
    from ffcompile.compiler.onnx_emit import to_onnx
    from ffcompile.compiler.tvm_build import compile_onnx
    from ffcompile.runtime.tvm import load

    t = time.perf_counter()
    lib = compile_onnx(to_onnx(prog, fuse=False), target, work / f"{prog.name}.so")
    log(f"    TVM compile of {prog.name}: {time.perf_counter() - t:.0f} s")
    return load(lib)


def compare(prog, feeds, threads: int, work: Path, tvm_target: dict, repeats: int, sample_ms: float) -> dict:
    import torch

    torch.set_num_threads(threads)
    r = B.Runners(prog, feeds, threads)
    tvm = tvm_runner(prog, tvm_target, work)
    got, want = tvm.run(feeds), r.ort_plain()
    max_abs = max(float(np.max(np.abs(np.asarray(got[k], np.float64) - want[k]))) for k in want if want[k].dtype.kind == "f")
    res = B.interleaved({"tvm": lambda: tvm.run(feeds), "ort_bound": r.ort_bound, "ort_plain": r.ort_plain,
                         "torch_eager": r.torch_eager}, repeats, sample_ms)
    ort_best = min(res["ort_bound"]["median_ms"], res["ort_plain"]["median_ms"])
    out = {"results": {k: {m: v[m] for m in ("median_ms", "min_ms", "iqr_ms", "samples", "calls_per_sample")}
                       for k, v in res.items()},
           "tvm_vs_best_ort": ort_best / res["tvm"]["median_ms"], "tvm_vs_torch": res["torch_eager"]["median_ms"] / res["tvm"]["median_ms"],
           "goal_tvm_le_ort": res["tvm"]["median_ms"] <= ort_best, "tvm_max_abs_diff_vs_ort": max_abs}
    for k, v in res.items():
        log(f"    {k:12s} median {v['median_ms']:9.3f} ms  IQR {v['iqr_ms']:7.3f}")
    return out


ARM_GUEST = r"""
import json, statistics, sys, time
import numpy as np
from ffcompile.runtime.tvm import load
lib, feeds_path, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
prog = load(lib)
with np.load(feeds_path, allow_pickle=False) as z:
    feeds = {k: z[k] for k in z.files}
prog.run(feeds)
times = []
for _ in range(steps):
    t = time.perf_counter(); prog.run(feeds); times.append((time.perf_counter() - t) * 1e3)
print(json.dumps({"median_ms": statistics.median(times), "all_ms": times}))
"""


def arm_emulated(work: Path, steps: int) -> dict:
    from ffcompile.emulation import qemu as emulation
    from ffcompile.compiler.targets import find_target

    target = find_target("arm-cpu")
    model = B.load(B.EDGE_MODEL)
    prog = B.program(model, "train_step", 100)
    feeds = B.feeds_for(model, prog, 100)
    from ffcompile.compiler.onnx_emit import to_onnx
    from ffcompile.compiler.tvm_build import compile_onnx

    lib = compile_onnx(to_onnx(prog, fuse=False), target.tvm, work / "arm_train_step.so", cc=emulation.cross_compiler())
    np.savez(work / "arm_feeds.npz", **feeds)
    sysroot = emulation.ensure_sysroot(progress=True)
    proc = sysroot.run_code(ARM_GUEST, [lib, work / "arm_feeds.npz", str(steps)], timeout=1800,
                            env={"PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"})
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    log(f"    arm-cpu (qemu) {model.name} train_step batch 100: median {res['median_ms']:.1f} ms")
    return {"model": model.name, "batch": 100, "target": target.to_json(), "steps": steps, **res,
            "note": "qemu-aarch64 user-mode emulation on the x86 host: not a Raspberry Pi's speed"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench_tvm.json")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--sample-ms", type=float, default=300.0)
    ap.add_argument("--arm-steps", type=int, default=5)
    ap.add_argument("--no-arm", action="store_true")
    args = ap.parse_args()
    import os

    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    from ffcompile.compiler.targets import find_target

    tvm_target = {**find_target("x86-cpu-tvm").tvm, "num-cores": args.threads}
    report = {"machine": B.cpu_info(), "load_before": B.machine_load(), "threads": args.threads,
              "tvm_target": tvm_target, "repeats": args.repeats}
    with tempfile.TemporaryDirectory(prefix="bench-tvm-") as tmp:
        work = Path(tmp)
        for key, path in (("train_step", B.BIG_MODEL), ("train_step_hybrid", REPO / "models" / "mnist-unsupervised.toml"),
                          ("train_step_local", REPO / "models" / "mnist-local.toml")):
            model = B.load(path)
            log(f"train_step {model.name} batch 100")
            prog = B.program(model, "train_step", 100)
            report[key] = {"model": model.name, "batch": 100, "matmul_flops": B.matmul_flops(prog),
                           **compare(prog, B.feeds_for(model, prog, 100), args.threads, work, tvm_target,
                                     args.repeats, args.sample_ms)}
        model = B.load(B.BIG_MODEL)
        log(f"infer_goodness {model.name} batch 1")
        prog = B.program(model, "infer_goodness", 1)
        report["infer_goodness_b1"] = {"model": model.name, "batch": 1,
                                       **compare(prog, B.feeds_for(model, prog, 1), args.threads, work, tvm_target,
                                                 args.repeats, args.sample_ms)}
        if not args.no_arm:
            log("arm-cpu train_step under qemu")
            report["arm_emulated"] = arm_emulated(work, args.arm_steps)
    report["load_after"] = B.machine_load()
    Path(args.out).write_text(json.dumps(report, indent=1))
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
