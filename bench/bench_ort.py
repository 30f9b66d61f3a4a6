#!/usr/bin/env python
"""onnxruntime vs torch eager on ffcompile's programs, side by side in one run.

    python bench/bench_ort.py                 # full run (a few minutes), writes bench_ort.json
    python bench/bench_ort.py --quick         # smoke run (well under a minute)
    python bench/bench_ort.py --out x.json --threads 2 --repeats 9

Everything runs with ``--threads`` threads (torch intra-op, onnxruntime intra-op, BLAS). Each
measurement interleaves the variants it compares (A, B, A, B, ...) so that a change in machine
load hits all of them alike, and reports the median, min and interquartile range of ``repeats``
samples; a sample is the mean of enough back-to-back calls to last ``--sample-ms``. The machine's
load (load average, other processes' CPU share) is recorded before and during every section
(``load`` in the JSON): compare numbers only from quiet runs.

Sections (all numbers go to the JSON; progress goes to stderr):

- ``peak``: best fp32 SGEMM rate of this machine (torch and numpy, square 2000..4000), and a
  large-copy memory bandwidth (bytes read + written), measured in this run.
- ``big_train_step``: models/mnist-supervised.toml (784-2000x4), batch 100. GFLOP/s counts the
  program's matmul FLOPs (2*m*k*n per matmul node) over the step's median time. ORT runs with
  outputs bound to preallocated arrays (``OrtProgram.run(out=...)``, what a training loop uses)
  and plainly (``run(feeds)``, allocating its outputs). Includes onnxruntime's own per-op profile
  (separate runs) and a bandwidth bound on the reachable fraction of peak.
- ``edge_train_step``: models/mnist-small.toml (784-500-500), batches 1..16.
- ``infer_goodness_b1``: one image, all 10 labels scored in one batched pass, both nets.
- ``memory``: working memory of one training step beyond parameters and optimizer state, FF
  (liveness analysis of the program; onnxruntime's measured peak RSS in a fresh process) versus
  backprop (torch autograd, same net and batch: saved activations + gradients, torch's memory
  profiler, measured peak RSS in a fresh process). See ``memory.definitions`` in the JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

if __name__ == "__main__" and "--child" not in sys.argv:
    # BLAS thread pools read these once, at import.
    _threads = "2"
    for i, a in enumerate(sys.argv):
        if a == "--threads" and i + 1 < len(sys.argv):
            _threads = sys.argv[i + 1]
        elif a.startswith("--threads="):
            _threads = a.split("=", 1)[1]
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, _threads)

import numpy as np  # noqa: E402

BIG_MODEL = REPO / "models" / "mnist-supervised.toml"
EDGE_MODEL = REPO / "models" / "mnist-small.toml"
MiB = 1 << 20


def log(*args):
    print(*args, file=sys.stderr, flush=True)


# -- measurement helpers ------------------------------------------------------------------------

def summarize(samples_s: list[float], calls_per_sample: int) -> dict:
    ms = np.array(samples_s) * 1e3
    q1, q3 = np.percentile(ms, [25, 75])
    return {"median_ms": float(np.median(ms)), "min_ms": float(ms.min()), "q1_ms": float(q1), "q3_ms": float(q3),
            "iqr_ms": float(q3 - q1), "samples": len(ms), "calls_per_sample": calls_per_sample,
            "all_ms": [round(float(x), 4) for x in ms]}


# Worker threads spin for a while after their work (libgomp's behind torch, TVM's pool) and stall
# the next framework's threads on the same cores: a call timed right after another framework's
# ran slower than in a loop of its own calls, a torch GEMM several times slower. Before each
# sample, the interleaved timing waits this long and makes one untimed call.
SETTLE_S = 0.05


def interleaved(fns: dict, repeats: int, sample_ms: float) -> dict[str, dict]:
    """Time every function ``repeats`` times, round-robin; each sample averages k calls and
    measures the function as a loop of its own calls runs it (see SETTLE_S)."""
    calls = {}
    for name, fn in fns.items():
        fn()  # warm-up: first-run allocation, onnxruntime's memory-pattern planning, caches
        t = time.perf_counter()
        fn()
        once = max(time.perf_counter() - t, 1e-7)
        calls[name] = max(1, int(np.ceil(sample_ms / 1e3 / once)))
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if len(fns) > 1:
                time.sleep(SETTLE_S)
                fn()
            k = calls[name]
            t = time.perf_counter()
            for _ in range(k):
                fn()
            samples[name].append((time.perf_counter() - t) / k)
    return {name: summarize(s, calls[name]) for name, s in samples.items()}


def commit() -> dict:
    """The checkout a benchmark ran from: its commit and whether tracked files had local changes."""
    git = lambda *a: subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True).stdout.strip()
    return {"sha": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def machine_load() -> dict:
    """Load average and, over half a second, how busy the CPUs are with other processes."""
    load = {"loadavg_1_5_15": list(os.getloadavg()), "cpus": os.cpu_count()}
    try:
        import psutil
    except ImportError:
        load["note"] = "psutil missing: no per-process view"
        return load
    me = {os.getpid(), *(c.pid for c in psutil.Process().children(recursive=True))}
    procs = list(psutil.process_iter(["pid", "name"]))
    for p in procs:
        try:
            p.cpu_percent(None)
        except psutil.Error:
            pass
    total = psutil.cpu_percent(interval=0.5)
    others = []
    for p in procs:
        try:
            pct = p.cpu_percent(None)
        except psutil.Error:
            continue
        if p.pid not in me and pct > 1.0:
            others.append((pct, p.info["name"], p.pid))
    others.sort(reverse=True)
    load["cpu_busy_percent_all_cpus"] = total
    load["other_processes_cpu_percent_of_one_cpu"] = round(sum(p for p, _, _ in others), 1)
    load["top_other_processes"] = [{"cpu_percent": p, "name": n, "pid": pid} for p, n, pid in others[:5]]
    return load


class LoadMonitor:
    """Samples, every ``interval`` seconds while a section runs, how many CPUs other processes
    keep busy (all CPUs' busy share minus this process tree's CPU time) and the load average."""

    def __init__(self, interval=1.0):
        import threading
        self.interval, self.samples, self.loads = interval, [], []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _tree_cpu(self, psutil):
        me = psutil.Process()
        total = 0.0
        for p in [me, *me.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    def _run(self):
        try:
            import psutil
        except ImportError:
            return
        ncpu = os.cpu_count() or 1
        psutil.cpu_percent(None)
        last_t, last_own = time.perf_counter(), self._tree_cpu(psutil)
        while not self._stop.wait(self.interval):
            busy = psutil.cpu_percent(None) / 100 * ncpu
            now, own = time.perf_counter(), self._tree_cpu(psutil)
            mine = max(0.0, own - last_own) / max(now - last_t, 1e-6)
            last_t, last_own = now, own
            self.samples.append(max(0.0, busy - mine))
            self.loads.append(os.getloadavg()[0])

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        if not self.samples:
            return {"note": "no samples (psutil missing or section shorter than the interval)"}
        return {"samples": len(self.samples), "other_processes_cpus_mean": float(np.mean(self.samples)),
                "other_processes_cpus_max": float(np.max(self.samples)), "loadavg_1min_max": float(np.max(self.loads))}


def cpu_info() -> dict:
    info = {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


# -- programs, feeds, FLOPs --------------------------------------------------------------------

def load(path):
    from ffcompile.core.spec import load_model
    return load_model(str(path))


def program(model, name, batch):
    from ffcompile.lowering import build_program
    return build_program(model, name, batch)


def feeds_for(model, prog, batch, seed=0) -> dict[str, np.ndarray]:
    """Initial parameters, mid-training-like optimizer state (small m, |v|), MNIST-range input."""
    from ffcompile.lowering import init_state
    params, state = init_state(model, seed)
    rng = np.random.default_rng(seed)
    feeds = dict(params)
    for name, value in state.items():
        feeds[name] = (np.abs if name.endswith(".v") else np.asarray)(
            rng.standard_normal(value.shape).astype(np.float32) * 1e-3)
    feeds["x"] = rng.random((batch, model.input.size), dtype=np.float32)
    feeds["y"] = rng.integers(0, model.input.label.classes, batch).astype(np.int64)
    feeds["x_other"] = rng.random((batch, model.input.size), dtype=np.float32)  # hybrid negatives' partners
    feeds["mask_bits"] = rng.integers(0, 2, (batch, model.input.size)).astype(np.float32)
    feeds["u"] = rng.random(batch, dtype=np.float32)
    feeds["lr"] = np.array(model.optimizer.lr, np.float32)
    feeds["step"] = np.array(10, np.float32)
    wanted = {v.name for v in prog.inputs}
    return {k: v for k, v in feeds.items() if k in wanted}


def value_shapes(prog) -> dict:
    """{name: shape} of every program input and node output."""
    return {v.name: v.shape for v in prog.inputs} | {n.output.name: n.output.shape for n in prog.nodes}


def matmul_flops(prog) -> int:
    shapes = value_shapes(prog)
    total = 0
    for n in prog.nodes:
        if n.op == "matmul":
            a = shapes[n.inputs[0]]
            k = a[0] if n.attrs.get("trans_a") else a[1]
            m, cols = n.output.shape
            total += 2 * m * k * cols
    return total


def state_bytes(prog) -> int:
    return sum(int(np.prod(v.shape)) * 4 for v in prog.inputs if "." in v.name)  # params + optimizer state


class Runners:
    """ORT (bound outputs / plain) and torch eager callables for one program."""

    def __init__(self, prog, feeds, threads, profile_prefix=None, shipped=False, **emit):
        """``shipped``: the ONNX a bundle ships (``shipped_onnx``); else ``to_onnx(prog, **emit)``."""
        from ffcompile.compiler.onnx_emit import shipped_onnx, to_onnx
        from ffcompile.runtime.ort import OrtProgram
        self.prog, self.feeds = prog, feeds
        self.model_bytes = (shipped_onnx(prog) if shipped else to_onnx(prog, **emit)).SerializeToString()
        self.ort = OrtProgram(self.model_bytes, threads=threads, name=prog.name, profile_prefix=profile_prefix)
        self.out = self.ort.output_buffers()
        self._torch = None

    def ort_bound(self):
        return self.ort.run(self.feeds, out=self.out)

    def ort_plain(self):
        return self.ort.run(self.feeds)

    def torch_eager(self):
        import torch
        from ffcompile.reference.interpreter import TorchProgram
        if self._torch is None:
            self._torch = (TorchProgram(self.prog), {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in self.feeds.items()})
        tp, tf = self._torch
        with torch.no_grad():
            return tp.run(tf)


# -- sections -----------------------------------------------------------------------------------

def section_peak(args) -> dict:
    import torch
    sizes = [2000] if args.quick else [2000, 3000, 4000]
    reps = 3 if args.quick else 5
    out = {"sgemm": [], "threads": args.threads}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        an, bn = a.numpy(), b.numpy()
        res = interleaved({"torch": lambda: a @ b, "numpy": lambda: an @ bn}, reps, sample_ms=0)
        for lib, r in res.items():
            out["sgemm"].append({"lib": lib, "n": n, "best_gflops": 2 * n ** 3 / r["min_ms"] / 1e6,
                                 "median_gflops": 2 * n ** 3 / r["median_ms"] / 1e6})
        log(f"  sgemm n={n}: " + ", ".join(f"{e['lib']} {e['best_gflops']:.1f}" for e in out["sgemm"][-2:]) + " GFLOP/s (best)")
    best = max(out["sgemm"], key=lambda e: e["best_gflops"])
    out["peak_gflops"] = best["best_gflops"]
    out["peak_from"] = f"{best['lib']} n={best['n']}"
    src = np.ones(64 * MiB // 4 * (2 if args.quick else 4), np.float32)
    dst = np.empty_like(src)
    r = interleaved({"copy": lambda: np.copyto(dst, src)}, reps, sample_ms=0)["copy"]
    out["copy_bandwidth_gbs"] = 2 * src.nbytes / r["min_ms"] / 1e6
    out["copy_bandwidth_note"] = f"numpy copy of {src.nbytes // MiB} MiB, bytes read + written over the best time (one thread)"
    log(f"  copy bandwidth {out['copy_bandwidth_gbs']:.1f} GB/s")
    return out


def ort_profile(runners, calls=3) -> dict:
    """onnxruntime's per-kernel profile of a few runs: ms per run by op type."""
    from ffcompile.runtime.ort import OrtProgram
    with tempfile.TemporaryDirectory() as tmp:
        prof = OrtProgram(runners.model_bytes, threads=runners.ort.session.get_session_options().intra_op_num_threads,
                          profile_prefix=os.path.join(tmp, "ort"))
        out = prof.output_buffers()
        for _ in range(calls + 1):
            prof.run(runners.feeds, out=out)
        events = json.loads(Path(prof.end_profiling()).read_text())
    by_op: dict[str, float] = {}
    runs = [e["dur"] for e in events if e.get("name") == "model_run"][1:]  # first run: warm-up
    first_run_end = next(e["ts"] + e["dur"] for e in events if e.get("name") == "model_run")
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first_run_end:
            op = e["args"].get("op_name", "?")
            by_op[op] = by_op.get(op, 0.0) + e["dur"]
    # Scan bodies' nodes are reported too (inside the Scan's own time): keep top-level ones only.
    return {"model_run_ms": float(np.median(runs)) / 1e3 if runs else None,
            "note": "kernel times per run by op type, top level; a Scan's time includes its body's nodes, "
                    "which are also listed under their own op types",
            "by_op_ms": {k: v / calls / 1e3 for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])}}


def section_big(args, peak) -> dict:
    model = load(BIG_MODEL)
    batch = args.big_batch
    prog = program(model, "train_step", batch)
    feeds = feeds_for(model, prog, batch)
    flops = matmul_flops(prog)
    r = Runners(prog, feeds, args.threads)
    rt = Runners(prog, feeds, args.threads, tiled_outputs=True)
    log(f"  {model.name} train_step batch {batch}: {flops / 1e9:.2f} GFLOP of matmuls")
    res = interleaved({"ort_bound": r.ort_bound, "ort_plain": r.ort_plain, "ort_bound_tiled_outputs": rt.ort_bound,
                       "torch_eager": r.torch_eager}, args.repeats, args.sample_ms)
    for name, s in res.items():
        s["gflops"] = flops / s["median_ms"] / 1e6
        s["fraction_of_peak"] = s["gflops"] / peak["peak_gflops"]
        log(f"    {name:12s} median {s['median_ms']:8.1f} ms  min {s['min_ms']:8.1f}  IQR {s['iqr_ms']:6.1f}  "
            f"{s['gflops']:6.1f} GFLOP/s = {100 * s['fraction_of_peak']:.0f}% of peak")
    out = {"model": model.name, "batch": batch, "matmul_flops": flops, "results": res,
           "variants": {"ort_bound": "to_onnx defaults, outputs bound to preallocated arrays (OrtProgram.run(out=...))",
                        "ort_plain": "to_onnx defaults, OrtProgram.run(feeds): onnxruntime allocates the outputs",
                        "ort_bound_tiled_outputs": "to_onnx(tiled_outputs=True) (opt-in), outputs bound",
                        "torch_eager": "TorchProgram.run under torch.no_grad()"}}
    del rt
    # Threads: 1 vs N, and how much CPU time the N-thread run used per wall second.
    one = Runners(prog, feeds, 1)
    t1 = interleaved({"ort_bound_1_thread": one.ort_bound, "ort_bound": r.ort_bound}, max(3, args.repeats // 2), args.sample_ms)
    c0, w0 = time.process_time(), time.perf_counter()
    for _ in range(3):
        r.ort_bound()
    out["threads_check"] = {
        "ort_1_thread_median_ms": t1["ort_bound_1_thread"]["median_ms"],
        "ort_n_threads_median_ms": t1["ort_bound"]["median_ms"],
        "speedup": t1["ort_bound_1_thread"]["median_ms"] / t1["ort_bound"]["median_ms"],
        "cpu_seconds_per_wall_second": (time.process_time() - c0) / (time.perf_counter() - w0),
        "note": "with onnxruntime's default spinning, idle workers also count as busy"}
    log(f"    threads: 1 -> {args.threads} speedup {out['threads_check']['speedup']:.2f}, "
        f"CPU/wall {out['threads_check']['cpu_seconds_per_wall_second']:.2f}")
    del one
    out["ort_profile"] = ort_profile(r)
    gemm_ms = sum(v for k, v in out["ort_profile"]["by_op_ms"].items() if k in ("Gemm", "FusedGemm", "MatMul", "FusedMatMul"))
    out["ort_profile"]["gemm_ms"] = gemm_ms
    out["ort_profile"]["gemm_gflops"] = flops / gemm_ms / 1e6 if gemm_ms else None
    # What the step must at least cost: its FLOPs at peak, plus reading the parameters and
    # optimizer state and writing their new values once at the measured copy bandwidth (the
    # update runs after the gradients, so the two do not overlap in a sequential executor).
    must_move = 2 * state_bytes(prog)
    t_flop = flops / (peak["peak_gflops"] * 1e9)
    t_mem = must_move / (peak["copy_bandwidth_gbs"] * 1e9)
    out["bound"] = {"bytes_params_and_state_read_and_written": must_move, "t_flops_at_peak_ms": t_flop * 1e3,
                    "t_bytes_at_copy_bandwidth_ms": t_mem * 1e3,
                    "max_fraction_of_peak_without_overlap": t_flop / (t_flop + t_mem)}
    log(f"    bound: {1e3 * t_flop:.0f} ms of FLOPs + {1e3 * t_mem:.0f} ms of parameter/state traffic -> "
        f"at most {100 * out['bound']['max_fraction_of_peak_without_overlap']:.0f}% of peak without overlap")
    if not args.quick and args.big_batch_large:
        prog_l = program(model, "train_step", args.big_batch_large)
        rl = Runners(prog_l, feeds_for(model, prog_l, args.big_batch_large), args.threads)
        fl = matmul_flops(prog_l)
        resl = interleaved({"ort_bound": rl.ort_bound, "torch_eager": rl.torch_eager}, max(3, args.repeats // 2), args.sample_ms)
        for s in resl.values():
            s["gflops"] = fl / s["median_ms"] / 1e6
            s["fraction_of_peak"] = s["gflops"] / peak["peak_gflops"]
        out["larger_batch"] = {"batch": args.big_batch_large, "matmul_flops": fl, "results": resl}
        log(f"    batch {args.big_batch_large}: " + ", ".join(
            f"{k} {v['median_ms']:.0f} ms = {100 * v['fraction_of_peak']:.0f}% of peak" for k, v in resl.items()))
    return out


def section_edge(args) -> dict:
    model = load(EDGE_MODEL)
    rows = []
    for batch in args.edge_batches:
        prog = program(model, "train_step", batch)
        r = Runners(prog, feeds_for(model, prog, batch), args.threads)
        res = interleaved({"ort_bound": r.ort_bound, "ort_plain": r.ort_plain, "torch_eager": r.torch_eager},
                          args.repeats, args.sample_ms)
        row = {"batch": batch, "results": res,
               "speedup_bound": res["torch_eager"]["median_ms"] / res["ort_bound"]["median_ms"],
               "speedup_plain": res["torch_eager"]["median_ms"] / res["ort_plain"]["median_ms"]}
        row["speedup"] = max(row["speedup_bound"], row["speedup_plain"])
        rows.append(row)
        log(f"  {model.name} batch {batch:3d}: ort {res['ort_bound']['median_ms']:.3f} ms (plain {res['ort_plain']['median_ms']:.3f}), "
            f"torch {res['torch_eager']['median_ms']:.3f} ms -> {row['speedup']:.2f}x")
    return {"model": model.name, "rows": rows}


def section_infer(args) -> dict:
    rows = []
    for path in (EDGE_MODEL, BIG_MODEL):
        model = load(path)
        prog = program(model, "infer_goodness", 1)
        r = Runners(prog, feeds_for(model, prog, 1), args.threads)
        res = interleaved({"ort_bound": r.ort_bound, "ort_plain": r.ort_plain, "torch_eager": r.torch_eager},
                          args.repeats, args.sample_ms)
        row = {"model": model.name, "rows_per_pass": model.input.label.classes, "matmul_flops": matmul_flops(prog),
               "results": res, "speedup_bound": res["torch_eager"]["median_ms"] / res["ort_bound"]["median_ms"],
               "speedup_plain": res["torch_eager"]["median_ms"] / res["ort_plain"]["median_ms"]}
        row["speedup"] = max(row["speedup_bound"], row["speedup_plain"])
        rows.append(row)
        log(f"  {model.name} infer_goodness batch 1: ort {res['ort_bound']['median_ms']:.3f} ms (plain "
            f"{res['ort_plain']['median_ms']:.3f}), torch {res['torch_eager']['median_ms']:.3f} ms -> {row['speedup']:.2f}x")
    return {"rows": rows}


# -- memory -------------------------------------------------------------------------------------

_ITEMSIZE = {"float32": 4, "int64": 8, "bool": 1}


def _nbytes(v) -> int:
    return int(np.prod(v.shape, dtype=np.int64)) * _ITEMSIZE[v.dtype]


def _counted_values(prog) -> dict[str, int]:
    """Bytes of every value that counts as working memory: node outputs, except constants and the
    new parameters / optimizer state (and the value each of those copies), which correspond to
    the parameters and state that backprop's optimizer updates in place."""
    producers = {n.output.name: n for n in prog.nodes}
    excluded = set()
    for v in prog.outputs:
        if v.name.startswith("new."):
            excluded.add(v.name)
            src = producers[v.name]
            if src.op == "identity" and src.inputs[0] in producers:
                excluded.add(src.inputs[0])
    return {n.output.name: _nbytes(n.output) for n in prog.nodes
            if n.op != "constant" and n.output.name not in excluded}


def liveness_peak(prog, order) -> dict:
    """Peak bytes of simultaneously live counted values when nodes run in ``order``; a value is
    live from its producer until its last consumer (program outputs: until the end)."""
    sizes = _counted_values(prog)
    last = {}
    for pos, n in enumerate(order):
        for x in n.inputs:
            last[x] = pos
    for v in prog.outputs:
        last[v.name] = len(order)
    live, current, peak, peak_at, peak_set = {}, 0, 0, -1, []
    for pos, n in enumerate(order):
        name = n.output.name
        if name in sizes:
            live[name] = sizes[name]
            current += sizes[name]
        if current > peak:
            peak, peak_at, peak_set = current, pos, sorted(live.items(), key=lambda kv: -kv[1])[:6]
        for x in set(n.inputs) | {name}:
            if x in live and last.get(x, pos) <= pos:
                current -= live.pop(x)
    return {"peak_bytes": int(peak), "peak_mib": peak / MiB, "peak_at_node": order[peak_at].output.name if peak_at >= 0 else None,
            "largest_live_at_peak": [{"value": k, "mib": b / MiB} for k, b in peak_set]}


def onnx_liveness(model) -> dict:
    """The same analysis on the emitted ONNX graph, in its node order (what onnxruntime runs with
    ``OrtProgram``'s priority-based order): Reshape outputs alias their input (onnxruntime's
    Reshape does) except where they are program outputs (then they are a copy into the bound
    output buffer, not counted); a Scan also holds its body's tile-sized temporaries while it runs."""
    import onnx
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    dtype_size = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.INT64: 8, onnx.TensorProto.BOOL: 1}

    def size_of(vi):
        t = vi.type.tensor_type
        dims = [d.dim_value for d in t.shape.dim]
        return int(np.prod(dims, dtype=np.int64)) * dtype_size.get(t.elem_type, 4) if all(d > 0 for d in dims) else 0

    sizes = {vi.name: size_of(vi) for vi in [*g.value_info, *g.output]}
    graph_inputs = {i.name for i in g.input} | {i.name for i in g.initializer}
    outputs = {o.name for o in g.output}
    alias: dict[str, str] = {}

    def root(name):
        while name in alias:
            name = alias[name]
        return name

    def body_reads(node):
        names = set()
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                body = attr.g
                local = {i.name for i in body.input} | {t.name for t in body.initializer} | {o for n in body.node for o in n.output}
                names |= {x for n in body.node for x in n.input if x and x not in local}
        return names

    def body_bytes(node):
        """The peak of a Scan body's own values while it runs one tile: its inputs (the tile's
        slices) and node outputs, each live until its last use in the body (its outputs: until
        the end). Values without a known shape count as the largest known one."""
        total = 0
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                body = attr.g
                known = {vi.name: size_of(vi) for vi in [*body.input, *body.output, *body.value_info]}
                tile = max(known.values()) if known else 0
                done = {o.name for o in body.output}
                last_use: dict[str, int] = {}
                for pos, n in enumerate(body.node):
                    for x in n.input:
                        last_use[x] = pos
                live = {i.name: known.get(i.name, tile) for i in body.input}
                peak = sum(live.values())
                for pos, n in enumerate(body.node):
                    for o in n.output:
                        live[o] = known.get(o, tile)
                    peak = max(peak, sum(live.values()))
                    for x in list(live):
                        if x not in done and last_use.get(x, -1) <= pos:
                            del live[x]
                total += peak
        return total

    last: dict[str, int] = {}
    for pos, node in enumerate(g.node):
        if node.op_type == "Reshape" and node.output[0] not in outputs and node.input[0] not in outputs:
            alias[node.output[0]] = node.input[0]
        for x in [*node.input, *body_reads(node)]:
            if x:
                last[root(x)] = pos
    end = len(g.node)
    for o in outputs:
        last[root(o)] = end
    live: dict[str, int] = {}
    current = peak = 0
    peak_at, peak_set = None, []
    for pos, node in enumerate(g.node):
        for o in node.output:
            if o in alias or root(o) in graph_inputs or (o in outputs and o.startswith("new.")):
                continue
            live[o] = sizes.get(o, 0)
            current += live[o]
        transient = body_bytes(node)
        if current + transient > peak:
            peak, peak_at = current + transient, node.name
            peak_set = sorted(live.items(), key=lambda kv: -kv[1])[:6]
        for name in list(live):
            if last.get(name, pos) <= pos:
                current -= live.pop(name)
    return {"peak_bytes": int(peak), "peak_mib": peak / MiB, "peak_at_node": peak_at,
            "largest_live_at_peak": [{"value": k, "mib": b / MiB} for k, b in peak_set]}


def _vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return -1


def child_ort(args) -> dict:
    """Fresh process, no torch: peak RSS of onnxruntime running one FF train step."""
    import resource
    from ffcompile.runtime.ort import OrtProgram
    model = load(args.model)
    prog = program(model, "train_step", args.batch)
    feeds = feeds_for(model, prog, args.batch)
    model_bytes = Path(args.model_file).read_bytes()
    gc.collect()
    rss0 = _vm("VmRSS")
    ort_prog = OrtProgram(model_bytes, threads=args.threads, arena=not args.no_arena, emitted_order=not args.dfs_order)
    out = ort_prog.output_buffers()
    for a in out.values():
        a.fill(0)  # touch the output buffers: they stand for the (in-place) parameters and state
    rss1 = _vm("VmRSS")
    hwm1 = _vm("VmHWM")
    for _ in range(3):
        ort_prog.run(feeds, out=out)
    hwm2 = _vm("VmHWM")
    return {"rss_before_session": rss0, "rss_ready": rss1, "hwm_ready": hwm1, "hwm_after_steps": hwm2,
            "peak_rss_bytes": hwm2,
            "step_peak_over_ready_bytes": hwm2 - max(rss1, 0),
            "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def child_backprop(args) -> dict:
    """Fresh process: the same network trained by backprop (Linear+ReLU, softmax head, cross
    entropy, SGD with momentum) - peak RSS of one step, and torch's own accounting."""
    import resource
    import torch
    torch.set_num_threads(args.threads)
    model = load(args.model)
    sizes = [model.input.size, *(layer.size for layer in model.layers)]
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    net = torch.nn.Sequential(*layers, torch.nn.Linear(sizes[-1], model.input.label.classes))
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    for p in net.parameters():
        opt.state[p]["momentum_buffer"] = torch.zeros_like(p)  # optimizer state exists before the step
    x = torch.rand(args.batch, model.input.size)
    y = torch.randint(0, model.input.label.classes, (args.batch,))
    params = list(net.parameters())
    param_bytes = sum(p.numel() * 4 for p in params)

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()

    gc.collect()
    rss0 = _vm("VmRSS")
    step()
    hwm1 = _vm("VmHWM")
    result = {"rss_ready": rss0, "hwm_after_first_step": hwm1, "step_peak_over_ready_bytes": hwm1 - rss0,
              "peak_rss_bytes": hwm1,
              "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              "param_bytes": param_bytes}
    # Saved activations: what autograd keeps for backward, by storage, minus parameters and the input.
    skip = {p.untyped_storage().data_ptr() for p in params} | {x.untyped_storage().data_ptr()}
    saved: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            saved[s.data_ptr()] = s.nbytes()
        return t

    opt.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = torch.nn.functional.cross_entropy(net(x), y)
    loss.backward()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in params)
    result["saved_activation_bytes"] = sum(saved.values())
    result["gradient_bytes"] = grads
    result["saved_plus_gradients_bytes"] = sum(saved.values()) + grads
    # torch's memory profiler: peak of temporaries + activations + gradients + autograd detail.
    try:
        from torch.profiler import ProfilerActivity, profile
        from torch.profiler._memory_profiler import MemoryProfileTimeline
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
            step()
        _, sizes_t = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
        # columns: 0 unused, then PARAMETER, OPTIMIZER_STATE, INPUT, TEMPORARY, ACTIVATION, GRADIENT, AUTOGRAD_DETAIL, unknown
        work = [row[4] + row[5] + row[6] + row[7] for row in sizes_t]
        at = int(np.argmax(work))
        result["torch_profiler_peak_bytes"] = int(work[at])
        result["torch_profiler_at_peak"] = {"temporary": sizes_t[at][4], "activation": sizes_t[at][5],
                                            "gradient": sizes_t[at][6], "autograd_detail": sizes_t[at][7],
                                            "unknown": sizes_t[at][8]}
    except Exception as e:  # private API: keep the rest of the numbers if it moves
        result["torch_profiler_error"] = f"{type(e).__name__}: {e}"
    return result


def run_child(kind, model_path, batch, threads, model_file=None, no_arena=False, dfs_order=False, repeats=3) -> dict:
    """Median over ``repeats`` fresh processes of each number (each process runs once)."""
    runs = []
    for _ in range(repeats):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--model", str(model_path),
               "--batch", str(batch), "--threads", str(threads)]
        if model_file:
            cmd += ["--model-file", model_file]
        if no_arena:
            cmd += ["--no-arena"]
        if dfs_order:
            cmd += ["--dfs-order"]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
        if proc.returncode != 0:
            raise RuntimeError(f"child {kind} failed:\n{proc.stderr[-2000:]}")
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    merged = {}
    for key, value in runs[0].items():
        if isinstance(value, (int, float)):
            merged[key] = float(np.median([r[key] for r in runs]))
        else:
            merged[key] = value
    merged["processes"] = repeats
    return merged


def section_memory(args) -> dict:
    import onnx
    from ffcompile.compiler.onnx_emit import to_onnx
    model = load(BIG_MODEL)
    out = {"model": model.name, "parent_rss_bytes": _vm("VmRSS"), "definitions": {
        "counted": "working memory = bytes beyond the parameters, the optimizer state and the batch. For FF the "
                   "new parameters/state are not counted either: they stand for the parameters and state that "
                   "backprop's optimizer updates in place (our functional step writes them to a second set of "
                   "buffers - 'ff_state_bytes' per set - which a training loop alternates with the first).",
        "ff_liveness_program": "peak bytes of simultaneously live values of the train_step program, nodes in the "
                               "order the lowering writes them (every optimizer update after every layer's "
                               "gradient; the update's full-size temporaries as separate values).",
        "ff_liveness_onnx": "the same on the emitted ONNX graph in its node order, which onnxruntime follows "
                            "(OrtProgram's priority-based execution order): each layer's update right after its "
                            "gradient, tiled update chains (tile-sized temporaries, but a full-size Scan output per "
                            "updated tensor before it is copied into the output buffer), Reshape = alias.",
        "tiled_outputs": "variants with to_onnx(tiled_outputs=True) (opt-in): updated tensors leave the graph in "
                         "the Scan's tile layout, no full-size copy.",
        "ff_ort_rss": "fresh process without torch: peak RSS (VmHWM) over 3 bound train steps minus RSS once the "
                      "session exists and all inputs and (touched) output buffers are allocated; includes "
                      "onnxruntime's arena rounding. '_dfs_order': onnxruntime's default execution order; "
                      "'_no_arena': arena off.",
        "backprop_saved_plus_grads": "torch autograd, nn.Sequential(Linear+ReLU per layer, Linear head to the "
                                     "classes), cross entropy, SGD momentum (buffers preallocated): bytes of the "
                                     "storages autograd saves for backward (saved_tensors_hooks; parameters and the "
                                     "input excluded) + all parameter gradients.",
        "backprop_torch_profiler": "torch memory profiler's peak of temporary + activation + gradient + autograd-"
                                   "detail bytes over one step (forward, backward, optimizer).",
        "backprop_rss": "fresh process: peak RSS (VmHWM) of the first step minus RSS just before it.",
        "ru_maxrss": "getrusage(RUSAGE_SELF).ru_maxrss of each fresh process. On Linux a child inherits the "
                     "parent's peak across fork/exec, so it is meaningful only where it exceeds parent_rss_bytes; "
                     "'peak_rss_bytes' (VmHWM) is the process's own peak.",
    }, "rows": []}
    batches = [args.big_batch] if args.quick else [args.big_batch, args.memory_batch_large]
    for batch in batches:
        prog = program(model, "train_step", batch)
        proto = to_onnx(prog)
        proto_tiled = to_onnx(prog, tiled_outputs=True)
        row = {"batch": batch, "ff_state_bytes": state_bytes(prog),
               "ff_liveness_program": liveness_peak(prog, list(prog.nodes)),
               "ff_liveness_onnx": onnx_liveness(proto),
               "ff_liveness_onnx_tiled_outputs": onnx_liveness(proto_tiled)}
        files = []
        for p in (proto, proto_tiled):
            with tempfile.NamedTemporaryFile(suffix=".onnx", delete=False) as f:
                f.write(p.SerializeToString())
                files.append(f.name)
        try:
            reps = 1 if args.quick else 3
            row["ff_ort_rss"] = run_child("ort", BIG_MODEL, batch, args.threads, files[0], repeats=reps)
            row["ff_ort_rss_tiled_outputs"] = run_child("ort", BIG_MODEL, batch, args.threads, files[1], repeats=reps)
            if not args.quick:
                row["ff_ort_rss_dfs_order"] = run_child("ort", BIG_MODEL, batch, args.threads, files[0], dfs_order=True, repeats=reps)
                row["ff_ort_rss_no_arena"] = run_child("ort", BIG_MODEL, batch, args.threads, files[0], no_arena=True, repeats=reps)
            row["backprop"] = run_child("backprop", BIG_MODEL, batch, args.threads, repeats=reps)
        finally:
            for name in files:
                os.unlink(name)
        bp = row["backprop"]
        bp_counted = bp["saved_plus_gradients_bytes"]
        row["ratios"] = {
            "onnx_liveness_vs_backprop_saved_plus_grads": row["ff_liveness_onnx"]["peak_bytes"] / bp_counted,
            "onnx_liveness_tiled_outputs_vs_backprop_saved_plus_grads": row["ff_liveness_onnx_tiled_outputs"]["peak_bytes"] / bp_counted,
            "ort_rss_tiled_outputs_vs_backprop_rss":
                row["ff_ort_rss_tiled_outputs"]["step_peak_over_ready_bytes"] / bp["step_peak_over_ready_bytes"],
            "program_liveness_vs_backprop_saved_plus_grads": row["ff_liveness_program"]["peak_bytes"] / bp_counted,
            "ort_rss_vs_backprop_rss": row["ff_ort_rss"]["step_peak_over_ready_bytes"] / bp["step_peak_over_ready_bytes"],
        }
        if "torch_profiler_peak_bytes" in bp:
            row["ratios"]["onnx_liveness_vs_backprop_torch_profiler"] = row["ff_liveness_onnx"]["peak_bytes"] / bp["torch_profiler_peak_bytes"]
        out["rows"].append(row)
        log(f"  batch {batch}: FF liveness {row['ff_liveness_program']['peak_mib']:.1f} MiB (program), "
            f"{row['ff_liveness_onnx']['peak_mib']:.1f} MiB (emitted ONNX; tiled outputs "
            f"{row['ff_liveness_onnx_tiled_outputs']['peak_mib']:.1f}); ORT RSS +"
            f"{row['ff_ort_rss']['step_peak_over_ready_bytes'] / MiB:.1f} MiB (tiled outputs "
            f"+{row['ff_ort_rss_tiled_outputs']['step_peak_over_ready_bytes'] / MiB:.1f}) | backprop saved+grads "
            f"{bp_counted / MiB:.1f} MiB, profiler {bp.get('torch_profiler_peak_bytes', float('nan')) / MiB:.1f} MiB, "
            f"RSS +{bp['step_peak_over_ready_bytes'] / MiB:.1f} MiB")
    return out


# -- goals ----------------------------------------------------------------------------------------

def goals(report) -> dict:
    g = {}
    big = report.get("big_train_step")
    if big:
        ort, torch_ = big["results"]["ort_bound"], big["results"]["torch_eager"]
        g["big_train_step_fraction_of_peak"] = {
            "goal": "ORT train step (4x2000, batch %d) >= 85%% of this machine's SGEMM peak" % big["batch"],
            "value": ort["fraction_of_peak"], "pass": ort["fraction_of_peak"] >= 0.85,
            "value_tiled_outputs": big["results"]["ort_bound_tiled_outputs"]["fraction_of_peak"],
            "gemm_kernels_alone_fraction_of_peak": (big["ort_profile"]["gemm_gflops"] or 0) / report["peak"]["peak_gflops"],
            "bound_without_overlap": big["bound"]["max_fraction_of_peak_without_overlap"]}
        g["big_train_step_not_slower_than_torch"] = {
            "goal": "ORT median <= torch eager median", "ort_ms": ort["median_ms"], "torch_ms": torch_["median_ms"],
            "pass": ort["median_ms"] <= torch_["median_ms"]}
    edge = report.get("edge_train_step")
    if edge:
        speedups = {str(r["batch"]): r["speedup"] for r in edge["rows"]}
        g["edge_train_step_speedup"] = {"goal": "ORT (faster of bound/plain run) >= 2x faster than torch eager at every batch",
                                        "speedup_by_batch": speedups, "pass": min(speedups.values()) >= 2}
    inf = report.get("infer_goodness_b1")
    if inf:
        speedups = {r["model"]: r["speedup"] for r in inf["rows"]}
        g["infer_goodness_b1_speedup"] = {"goal": "ORT (faster of bound/plain run) >= 3x faster than torch eager (batch 1)",
                                          "speedup_by_model": speedups, "pass": min(speedups.values()) >= 3}
    mem = report.get("memory")
    if mem:
        by_batch = {str(r["batch"]): r["ratios"] for r in mem["rows"]}
        g["memory_ff_vs_backprop"] = {
            "goal": "FF working memory <= 0.5x backprop's (same net and batch)",
            "ratios_by_batch": by_batch,
            "pass_liveness": all(r["onnx_liveness_vs_backprop_saved_plus_grads"] <= 0.5 for r in by_batch.values()),
            "pass_measured_rss": all(r["ort_rss_vs_backprop_rss"] <= 0.5 for r in by_batch.values()),
            "pass_liveness_tiled_outputs": all(r["onnx_liveness_tiled_outputs_vs_backprop_saved_plus_grads"] <= 0.5
                                               for r in by_batch.values()),
            "pass_measured_rss_tiled_outputs": all(r["ort_rss_tiled_outputs_vs_backprop_rss"] <= 0.5 for r in by_batch.values())}
        g["memory_ff_vs_backprop"]["pass"] = (g["memory_ff_vs_backprop"]["pass_liveness"]
                                              and g["memory_ff_vs_backprop"]["pass_measured_rss"])
    return g


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_ort.json")
    ap.add_argument("--quick", action="store_true", help="small sizes, few repeats: a smoke run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=None, help="samples per measurement (default 7, quick 3)")
    ap.add_argument("--sample-ms", type=float, default=None, help="min duration of one sample (default 50, quick 10)")
    ap.add_argument("--big-batch", type=int, default=100)
    ap.add_argument("--big-batch-large", type=int, default=1000, help="extra timing of the big net at this batch (0: skip)")
    ap.add_argument("--memory-batch-large", type=int, default=1000)
    ap.add_argument("--edge-batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--sections", nargs="+", default=["peak", "big", "edge", "infer", "memory"])
    # internal: fresh-process memory measurements
    ap.add_argument("--child", choices=["ort", "backprop"])
    ap.add_argument("--model")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--model-file")
    ap.add_argument("--no-arena", action="store_true")
    ap.add_argument("--dfs-order", action="store_true")
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps((child_ort if args.child == "ort" else child_backprop)(args)))
        return
    args.repeats = args.repeats or (3 if args.quick else 7)
    args.sample_ms = args.sample_ms if args.sample_ms is not None else (10.0 if args.quick else 50.0)

    import onnx
    import onnxruntime
    import torch
    torch.set_num_threads(args.threads)
    report = {"tool": "bench/bench_ort.py", "argv": sys.argv[1:], "quick": args.quick, "threads": args.threads,
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpu": cpu_info(),
              "versions": {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
                           "numpy": np.__version__, "onnx": onnx.__version__},
              "load": {}}
    t_start = time.perf_counter()
    # Memory first: its fresh processes inherit this process's peak RSS as their ru_maxrss floor.
    sections = [("memory", "memory", lambda: section_memory(args)),
                ("peak", "peak", lambda: section_peak(args)),
                ("big", "big_train_step", lambda: section_big(args, report["peak"])),
                ("edge", "edge_train_step", lambda: section_edge(args)),
                ("infer", "infer_goodness_b1", lambda: section_infer(args))]
    if "big" in args.sections and "peak" not in args.sections:
        args.sections.insert(0, "peak")
    for key, name, fn in sections:
        if key not in args.sections:
            continue
        report["load"][f"before_{name}"] = machine_load()
        log(f"[{name}] (load average {report['load'][f'before_{name}']['loadavg_1_5_15'][0]:.2f}, other processes "
            f"{report['load'][f'before_{name}'].get('other_processes_cpu_percent_of_one_cpu', '?')}% of one CPU)")
        with LoadMonitor() as monitor:
            report[name] = fn()
        report["load"][f"during_{name}"] = monitor.summary()
        log(f"  (during {name}: other processes kept {monitor.summary().get('other_processes_cpus_mean', float('nan')):.2f} "
            f"of {os.cpu_count()} CPUs busy on average)")
        gc.collect()
    report["load"]["end"] = machine_load()
    report["goals"] = goals(report)
    report["seconds"] = time.perf_counter() - t_start
    Path(args.out).write_text(json.dumps(report, indent=1))
    log(f"wrote {args.out} in {report['seconds']:.0f} s")
    for name, g in report["goals"].items():
        log(f"  {name}: {'PASS' if g['pass'] else 'FAIL'}")


if __name__ == "__main__":
    main()
