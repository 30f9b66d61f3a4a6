"""float32 vs float16 vs int8 inference programs of trained runs, side by side, as JSON.

For each run (NAME=RUN_DIR): the official test error of both readouts in each dtype, the size of
what inference needs (the standalone program of ``ffcompile export``, weights inside) and of the
x86-cpu bundles, latency on this CPU at batch 1 and 100 (onnxruntime, one thread, interleaved
medians), and with ``--emulate`` the arm-cpu-ort bundles' cost on the emulated aarch64 device
(peak resident memory, instructions per call; ``ffcompile verify --emulate``).

    python bench/bench_dtypes.py --run mnist-small=runs/small --run mnist-supervised=runs/sup \\
        --data-dir DIR --work /tmp/dtypes --out docs/results/dtypes.json [--emulate mnist-small]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DTYPES = ("float32", "float16", "int8")
READOUTS = ("goodness", "softmax")


def ffcompile(*args) -> dict:
    out = subprocess.run([sys.executable, "-m", "ffcompile", *map(str, args), "--json"], capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"bench_dtypes: ffcompile {' '.join(map(str, args))} failed: {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def test_error(sess, x, y, batch=100) -> float:
    predictions = np.concatenate([sess.run(["prediction"], {"x": x[i:i + batch]})[0] for i in range(0, len(x), batch)])
    return float(np.mean(predictions != y) * 100)


def latencies(sessions: dict, x, batch: int, seconds: float) -> dict:
    """Median ms per call of each session, calls interleaved so that load changes hit all alike;
    as many rounds as fit in about ``seconds`` (at least 5, at most 500)."""
    rows = x[:batch]
    times = {name: [] for name in sessions}
    started = time.perf_counter()
    for sess in sessions.values():
        sess.run(None, {"x": rows})
    one_round = time.perf_counter() - started
    for _ in range(min(500, max(5, int(seconds / max(one_round, 1e-6))))):
        for name, sess in sessions.items():
            started = time.perf_counter()
            sess.run(None, {"x": rows})
            times[name].append((time.perf_counter() - started) * 1e3)
    return {name: round(statistics.median(t), 3) for name, t in times.items()}


def bench_run(name: str, run: Path, args, x, y) -> dict:
    from ffcompile.runtime.bundle import bundle_bytes

    work = args.work / name
    work.mkdir(parents=True, exist_ok=True)
    from ffcompile.compiler.export import load_source

    model, _, digest = load_source(run)
    from ffcompile.contract.checkpoint import load_checkpoint

    epoch = load_checkpoint(run / "checkpoint.safetensors").epoch
    row = {"run": str(run), "model": model.name, "source_sha256": digest, "epochs_trained": epoch,
           "command": " ".join(["python", *sys.argv]), "readouts": {}}
    for readout in READOUTS:
        files = {}
        for dtype in DTYPES:
            files[dtype] = work / f"{readout}.{dtype}.onnx"
            ffcompile("export", run, "-o", files[dtype], "--readout", readout, "--dtype", dtype,
                      "--data-dir", args.data_dir)
        sessions = {dtype: session(path) for dtype, path in files.items()}
        result = {"export_bytes": {d: p.stat().st_size for d, p in files.items()},
                  "test_error_percent": {d: round(test_error(s, x, y), 3) for d, s in sessions.items()}}
        load = os.getloadavg()[0]
        result["latency_ms"] = {f"batch_{b}": latencies(sessions, x, b, args.seconds) for b in (1, 100)}
        result["loadavg_1min_during"] = [round(load, 2), round(os.getloadavg()[0], 2)]
        f32 = result["latency_ms"]
        result["int8_speedup"] = {b: round(f32[b]["float32"] / f32[b]["int8"], 2) for b in f32}
        result["int8_size_ratio"] = round(result["export_bytes"]["int8"] / result["export_bytes"]["float32"], 3)
        result["int8_error_change_points"] = round(result["test_error_percent"]["int8"] - result["test_error_percent"]["float32"], 3)
        row["readouts"][readout] = result
        print(f"{name} {readout}: {json.dumps(result)}", file=sys.stderr, flush=True)
    bundles = {}
    for dtype in ("float32", "int8"):
        out = work / f"x86-{dtype}"
        ffcompile("build", run, "--target", "x86-cpu", "-o", out, "--dtype", dtype, "--verify-steps", "0",
                  "--data-dir", args.data_dir, "--no-progress")
        bundles[dtype] = bundle_bytes(out, json.loads((out / "manifest.json").read_text()))
    row["x86_cpu_bundle_bytes"] = bundles
    if name in args.emulate:
        row["emulated_aarch64"] = {"command": " ".join(["python", *sys.argv])}
        for dtype in ("float32", "int8"):
            out = work / f"arm-{dtype}"
            ffcompile("build", run, "--target", "arm-cpu-ort", "-o", out, "--dtype", dtype, "--verify-steps", "0",
                      "--data-dir", args.data_dir, "--no-progress")
            report = ffcompile("verify", out, "--emulate", "--steps", "1", "--data-dir", args.data_dir)
            row["emulated_aarch64"][dtype] = {"passed": report["passed"], **report["emulated"]["cost"]}
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="append", required=True, metavar="NAME=RUN_DIR", help="a trained run to compare")
    ap.add_argument("--data-dir", required=True, help="full MNIST (IDX .gz files)")
    ap.add_argument("--work", type=Path, required=True, help="folder for the exported programs and bundles")
    ap.add_argument("--out", type=Path, required=True, help="result JSON")
    ap.add_argument("--seconds", type=float, default=20.0, help="time spent timing each batch size (all dtypes)")
    ap.add_argument("--update", action="store_true",
                    help="keep what --out already holds; replace what this run measures (a run's emulated "
                         "results stay unless it is emulated again)")
    ap.add_argument("--emulate", action="append", default=[], metavar="NAME",
                    help="also build arm-cpu-ort bundles of this run and measure them under qemu (slow)")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from ffcompile.data.mnist import load_mnist

    x, y = load_mnist(args.data_dir, "test")
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    report = {"benchmark": "bench/bench_dtypes.py", "command": " ".join(["python", *sys.argv]),
              "machine": {"cpu": cpu, "cores": os.cpu_count(), "loadavg_before": os.getloadavg()},
              "data": "MNIST official test set (10,000 images)",
              "notes": {"latency": "onnxruntime CPU provider, one intra-op thread, median of interleaved calls",
                        "float16": "onnxruntime's x86 CPU provider has no fast fp16 matrix kernels: its fp16 latency "
                                   "here is not what an fp16 device (GPU, ARMv8.2) sees; its error is",
                        "sizes": "export_bytes: the standalone program (weights inside), what inference needs; "
                                 "x86_cpu_bundle_bytes: whole bundles (an int8 bundle also keeps the float32 "
                                 "weights and train step for fine-tuning)"},
              "runs": json.loads(args.out.read_text())["runs"] if args.update and args.out.exists() else {}}
    for item in args.run:
        name, _, run = item.partition("=")
        report["runs"][name] = {**report["runs"].get(name, {}), **bench_run(name, Path(run), args, x, y)}
    report["machine"]["loadavg_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
