#!/usr/bin/env python
"""One FF train step: the compiled programs against PyTorch as users write it, in ONE process.

    python bench/bench_step.py --out step.json            # all sizes (tens of minutes on 2 cores)
    python bench/bench_step.py --sizes 2x500/8 --repeats 3 --no-memory --out quick.json

Variants, timed interleaved (A B C ... A B C ...), medians of ``--repeats`` samples, each sample
the mean of enough back-to-back calls to last ``--sample-ms``, all with ``--threads`` threads:

- ``tvm``: the compiled ``train_step`` (targets/x86-cpu-tvm.toml, portable x86-64-v3);
  ``tvm_native``: the same for targets/x86-cpu-tvm-native.toml (the build host's own CPU). Both get
  their state in aligned buffers, as in training, where a step's state is the previous outputs.
- ``ort``: the compiled ``train_step`` in onnxruntime as a bundle ships it (``shipped_onnx``), outputs
  bound to preallocated arrays.
- ``torch_hand``: the step written by hand in PyTorch (ffcompile/reference/hand_step.py: addmm, closed-form local
  gradients, ``torch._foreach`` Adam, in place), checked once against ``train_step``.
- ``torch_hand_compiled``: ``torch.compile`` of it (compile time reported separately).
- ``torch_oracle``: ffcompile/oracle.py, autograd as public FF code writes it (detach between
  layers, one backward per layer, torch.optim built per call from the state it is handed, which
  it clones: a functional step).
- ``torch_oracle_compiled``: ``torch.compile`` of the oracle, only where ``--oracle-compile`` says.
- ``interpreter``: ffcompile's TorchProgram running the lowered program op by op: a reference
  line, not PyTorch as a user writes it.

The machine's fp32 SGEMM peak (torch.mm) and copy bandwidth (torch copy_) are measured in the same
run; every size records the load during its timing. Per variant: median ms, % of the SGEMM peak
(matmul FLOPs of the program / time), ratio to the memory-bandwidth bound (parameters and optimizer
state read and written once / copy bandwidth).

What the machine allows, per size, beside them: ``matmul_products``, the step's matrix products
alone in torch.mm (timed interleaved with the variants: a reference line, not a step), and
``sweep_bound_ms``, the bandwidth bound with the weight reads of the forward passes, which the
step's data dependencies keep out of the update's sweep.
"""

from __future__ import annotations

import argparse
import os
import sys

_THREADS = next((sys.argv[i + 1] for i, a in enumerate(sys.argv[:-1]) if a == "--threads"), "2")
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TVM_NUM_THREADS"):
    os.environ.setdefault(_var, _THREADS)  # thread pools read these once, at import
os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")  # compile times without inductor's on-disk cache

import json  # noqa: E402
import shlex  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(HERE), str(REPO / "tools")]
warnings.filterwarnings("ignore", category=UserWarning)

import bench_ort as B  # noqa: E402  (timing, load, program, feed and FLOP helpers)
from ffcompile.reference.hand_step import hand_step  # noqa: E402

log = B.log
MiB = 1 << 20
# The 4x2000 rows time the paper network with Adam (mnist-supervised-adam.toml): it moves twice the
# optimizer state of the recipe's SGD per step, the harder case for a compiled update. Working
# memory is measured on mnist-supervised.toml itself.
MODELS = {"4x2000": REPO / "models" / "mnist-supervised-adam.toml", "2x500": REPO / "models" / "mnist-small.toml"}
MEMORY_MODEL = REPO / "models" / "mnist-supervised.toml"
SIZES = ["4x2000/100", "4x2000/1000", "2x500/1", "2x500/8", "2x500/16", "2x500/100"]
LABELS = {
    "tvm": "compiled train_step, TVM (x86-cpu-tvm, x86-64-v3)",
    "tvm_native": "compiled train_step, TVM (x86-cpu-tvm-native, host CPU)",
    "ort": "compiled train_step, ONNX Runtime (x86-cpu)",
    "torch_hand": "PyTorch hand-written (addmm + torch._foreach Adam), eager",
    "torch_hand_compiled": "torch.compile(PyTorch hand-written)",
    "torch_oracle": "PyTorch autograd (oracle.py: detach, backward per layer, torch.optim), eager",
    "torch_oracle_compiled": "torch.compile(PyTorch autograd oracle)",
    "interpreter": "ffcompile TorchProgram interpreter (reference line, not user PyTorch)",
}


def measure_peak(threads: int, repeats: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    out = {"sgemm": []}
    for n in (2000, 3000):
        a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
        r = B.interleaved({"mm": lambda: torch.mm(a, b, out=c)}, repeats, sample_ms=0)["mm"]
        out["sgemm"].append({"n": n, "best_gflops": 2 * n ** 3 / r["min_ms"] / 1e6,
                             "median_gflops": 2 * n ** 3 / r["median_ms"] / 1e6})
    out["sgemm_peak_gflops"] = max(e["best_gflops"] for e in out["sgemm"])
    out["copy_bandwidth_gbs"] = copy_bandwidth(256 * MiB, threads)
    out["how"] = (f"torch.mm of n x n fp32 matrices (best of {repeats}, {threads} threads); copy: torch copy_ of a "
                  "256 MiB fp32 tensor, bytes read + written over the best of 5 samples")
    log(f"  SGEMM peak {out['sgemm_peak_gflops']:.1f} GFLOP/s, copy {out['copy_bandwidth_gbs']:.1f} GB/s")
    return out


def copy_bandwidth(nbytes: int, threads: int) -> float:
    """GB/s (read + written) of torch copy_ between two fp32 tensors of ``nbytes`` each."""
    import torch

    torch.set_num_threads(threads)
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    r = B.interleaved({"copy": lambda: dst.copy_(src)}, 5, sample_ms=50)["copy"]
    return 2 * nbytes / r["min_ms"] / 1e6


def matmul_products(prog, threads: int):
    """A callable that runs the program's matrix products alone, back to back, in torch.mm (the
    machine's SGEMM library): the same shapes and layouts (a transposed operand as a transposed
    view, as MKL takes it), random normal values, outputs preallocated. What a step costs at the
    least if its products ran exactly as fast as the library runs them and nothing else took time."""
    import torch

    torch.set_num_threads(threads)
    shapes = B.value_shapes(prog)
    calls = []
    for n in prog.nodes:
        if n.op != "matmul":
            continue
        a, b = (torch.randn(*shapes[name]) for name in n.inputs[:2])
        a = a.T if n.attrs.get("trans_a") else a
        b = b.T if n.attrs.get("trans_b") else b
        calls.append((a, b, torch.empty(*n.output.shape)))

    def run():
        for a, b, out in calls:
            torch.mm(a, b, out=out)
    return run


def weight_reads_bytes(prog) -> int:
    """Bytes of parameters the program's matmuls read as operands: each weight, or the slice of
    its columns a matmul takes (a first layer's label columns), once per matmul that takes it."""
    read = {v.name: v.shape for v in prog.inputs if v.name.endswith((".weight", ".bias"))}
    for n in prog.nodes:
        if n.op == "slice" and n.inputs[0] in read:
            read[n.output.name] = n.output.shape
    return sum(int(np.prod(read[name])) * 4 for n in prog.nodes if n.op == "matmul" for name in n.inputs[:2]
               if name in read)


def tensors(feeds: dict):
    import torch

    T = {k: torch.from_numpy(np.array(v)) for k, v in feeds.items()}
    params = {k: T[k] for k in T if k.endswith((".weight", ".bias"))}
    state = {k: T[k] for k in T if k not in params and "." in k}
    return T, params, state


def aligned(feeds: dict) -> dict:
    """The parameters and optimizer state in 64-byte aligned buffers, as a compiled TVM step gets
    them in training, where each step's state is the previous step's output, which ``TVMProgram``
    passes without a copy (an unaligned array is first copied into a staging buffer: 163 MB per
    step at 4x2000 with Adam). The batch stays as given, as the training loop hands it over."""
    from ffcompile.runtime.tvm import _aligned_empty
    out = dict(feeds)
    for name, value in feeds.items():
        if "." in name:  # parameters and optimizer state (as in bench_ort.state_bytes)
            out[name] = _aligned_empty(value.shape, value.dtype)
            out[name][...] = value
    return out


def check_hand_step(model, prog, feeds) -> dict:
    """The hand-written step against the lowered train_step (onnxruntime), same inputs."""
    from ffcompile.runtime.ort import OrtProgram
    from ffcompile.compiler.onnx_emit import shipped_onnx

    want = OrtProgram(shipped_onnx(prog).SerializeToString(), threads=1).run(feeds)
    T, params, state = tensors(feeds)
    negative = hand_step(model)(params, state, T["x"], T["y"], T["u"], float(feeds["lr"]), float(feeds["step"]))
    rel = {k: float(np.abs(v.numpy() - want[f"new.{k}"]).max() / (np.abs(want[f"new.{k}"]).max() + 1e-30))
           for k, v in {**params, **state}.items()}
    worst = max(rel, key=rel.get)
    return {"against": "train_step in onnxruntime", "max_relative_difference": rel[worst], "worst": worst,
            "negative_labels_equal": bool(np.array_equal(negative.numpy(), want["negative_labels"])),
            "ok": rel[worst] < 1e-4}


def compile_tvm(prog, target_name: str, threads: int, work: Path):
    from ffcompile.compiler.onnx_emit import to_onnx
    from ffcompile.compiler.tvm_build import compile_onnx
    from ffcompile.runtime.tvm import load
    from ffcompile.compiler.targets import find_target

    target = {**find_target(target_name).tvm, "num-cores": threads}
    t = time.perf_counter()
    lib = compile_onnx(to_onnx(prog, fuse=False), target, work / f"{target_name}-{prog.name}-{time.time_ns()}.so")
    return load(lib), time.perf_counter() - t, target


def bench_size(size: str, args, peak: dict, work: Path) -> dict:
    import torch

    from ffcompile.reference.oracle import oracle_train_step

    arch, batch = size.split("/")
    batch = int(batch)
    model = B.load(MODELS[arch])
    prog = B.program(model, "train_step", batch)
    feeds = B.feeds_for(model, prog, batch)
    flops = B.matmul_flops(prog)
    state_bytes = B.state_bytes(prog)
    moved = 2 * state_bytes
    same_size = copy_bandwidth(state_bytes, args.threads)
    row = {"size": size, "model": model.name, "layers": arch, "batch": batch, "matmul_flops": flops,
           "params_and_state_bytes": state_bytes, "copy_bandwidth_gbs_at_this_size": same_size,
           "bandwidth_bound_ms": moved / (same_size * 1e9) * 1e3,
           "bandwidth_bound_how": "parameters + optimizer state (Adam m, v; peer means) read and written once "
                                  "(2 x params_and_state_bytes) / the copy bandwidth of a tensor of params_and_state_bytes "
                                  "(torch copy_, best of 5 samples, measured just before this size; a working set "
                                  "that fits in cache copies faster than the 256 MiB copy of 'peak')",
           "sweep_bound_ms": (moved + weight_reads_bytes(prog)) / (same_size * 1e9) * 1e3,
           "sweep_bound_how": "the bandwidth bound plus every weight read once more by each matmul that takes it, at "
                              "the same copy bandwidth: the neutral pass and the positive/negative pass each read the "
                              "weights in a sweep of their own (the negative labels need the whole neutral pass, a "
                              "layer's gradient the whole layer's output) before the update's sweep; the first "
                              "layer's weights once, as the passes share its product with the images, and its "
                              "label columns once per pass",
           "compile_s": {}, "notes": {}}
    log(f"{size}: {model.name} batch {batch}, {flops / 1e9:.3f} GFLOP, bound {row['bandwidth_bound_ms']:.2f} ms")
    row["hand_step_check"] = check_hand_step(model, prog, feeds)
    log(f"  hand-written step vs train_step: max rel diff {row['hand_step_check']['max_relative_difference']:.2e}")

    # Every variant repeats the step from the same weights: lr 0 (a step costs the same at any lr).
    # Repeated on one batch at the real lr, the net saturates within tens of calls and denormal
    # gradients make every backend's GEMMs several times slower, at a different call for each.
    feeds = {**feeds, "lr": np.zeros_like(np.asarray(feeds["lr"]))}
    fns = {}
    state_in_place = aligned(feeds)
    for key, target in (("tvm", "x86-cpu-tvm"), ("tvm_native", "x86-cpu-tvm-native")):
        tvm_prog, seconds, tgt = compile_tvm(prog, target, args.threads, work)
        row["compile_s"][key] = round(seconds, 1)
        row["notes"][key] = f"TVM target {json.dumps(tgt)}"
        # as the training loop runs it: each step's new state written over the state it was given
        fns[key] = (lambda p: lambda: p.run(state_in_place, donate=True))(tvm_prog)
        log(f"  TVM {target} compile {seconds:.0f} s")
    runners = B.Runners(prog, feeds, args.threads, shipped=True)
    fns["ort"] = runners.ort_bound

    torch.set_num_threads(args.threads)
    T, params, state = tensors(feeds)
    lr, step = float(feeds["lr"]), float(feeds["step"])
    hand = hand_step(model)
    fns["torch_hand"] = lambda: hand(params, state, T["x"], T["y"], T["u"], lr, step)
    compiled = {}
    if not args.no_compile:
        torch._dynamo.reset()
        compiled["torch_hand_compiled"] = lambda: torch.compile(hand)
        row["notes"]["torch_hand_compiled"] = "torch.compile(default mode, inductor); lr and step fixed during timing"
    fns["torch_oracle"] = lambda: oracle_train_step(model, params, state, T["x"], T["y"], T["u"], lr, int(step))
    if not args.no_compile and size in args.oracle_compile:
        compiled["torch_oracle_compiled"] = lambda: torch.compile(oracle_train_step)
        row["notes"]["torch_oracle_compiled"] = (
            "torch.compile of oracle_train_step: dynamo breaks the graph at every backward() and recompiles the "
            "torch.optim part on every call (a new optimizer per call), hitting its recompile limit; measured as is")
    for key, make in compiled.items():
        try:
            fn = make()
            call = ((lambda f: lambda: f(params, state, T["x"], T["y"], T["u"], lr, step))(fn) if key == "torch_hand_compiled"
                    else (lambda f: lambda: f(model, params, state, T["x"], T["y"], T["u"], lr, int(step)))(fn))
            t = time.perf_counter()
            call()
            row["compile_s"][key] = round(time.perf_counter() - t, 1)
            fns[key] = call
            log(f"  {key}: first call (compile) {row['compile_s'][key]:.0f} s")
        except Exception as e:  # report, keep measuring the rest
            row["notes"][key] = f"torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
            log(f"  {key}: {row['notes'][key]}")
    for key in ("torch_oracle_compiled",):
        if key not in fns and key not in row["notes"]:
            row["notes"][key] = f"not run at this size (run with --oracle-compile {size})"
    fns["interpreter"] = runners.torch_eager
    products = matmul_products(prog, args.threads)

    repeats = args.repeats_large if batch >= 1000 else args.repeats
    # Every torch variant runs with 2 threads and with 1 (interleaved like the rest) and keeps its
    # faster median: on a shared 2-core machine torch's per-op thread barriers can cost more than
    # the second thread gains; the compiled programs get no such second chance.
    timed = {}
    for key, fn in fns.items():
        if key.startswith("torch_") or key == "interpreter":
            for threads in sorted({args.threads, 1}):
                timed[f"{key}@{threads}"] = (lambda f, n: lambda: (torch.set_num_threads(n), f()))(fn, threads)
        else:
            timed[key] = (lambda f: lambda: (torch.set_num_threads(args.threads), f()))(fn)
    timed["matmul_products"] = lambda: (torch.set_num_threads(args.threads), products())
    before = os.getloadavg()[0]
    with B.LoadMonitor() as monitor:
        res = B.interleaved(timed, repeats, args.sample_ms)
    torch.set_num_threads(args.threads)
    row["loadavg_during"] = [before, os.getloadavg()[0]]  # 1-minute load average as the timing began and ended
    row["load_during"] = monitor.summary()
    r = res["matmul_products"]
    row["matmul_products"] = {
        "label": "the step's matrix products alone in torch.mm (reference line, not a step)", "threads": args.threads,
        "median_ms": r["median_ms"], "min_ms": r["min_ms"], "iqr_ms": r["iqr_ms"],
        "percent_of_sgemm_peak": 100 * flops / (r["median_ms"] / 1e3) / 1e9 / peak["sgemm_peak_gflops"]}
    log(f"  matmul products alone (torch.mm) median {r['median_ms']:9.3f} ms  "
        f"{row['matmul_products']['percent_of_sgemm_peak']:5.1f} % peak")
    row["variants"] = {}
    for key in fns:
        options = {int(k.split("@")[1]): r for k, r in res.items() if "@" in k and k.split("@")[0] == key}
        threads, r = min(options.items(), key=lambda kv: kv[1]["median_ms"]) if options else (args.threads, res[key])
        seconds = r["median_ms"] / 1e3
        row["variants"][key] = {
            "label": LABELS[key], "threads": threads, "median_ms": r["median_ms"], "min_ms": r["min_ms"],
            "iqr_ms": r["iqr_ms"], "samples": r["samples"], "calls_per_sample": r["calls_per_sample"],
            "median_ms_by_threads": {str(n): o["median_ms"] for n, o in options.items()} or None,
            "gflops": flops / seconds / 1e9, "percent_of_sgemm_peak": 100 * flops / seconds / 1e9 / peak["sgemm_peak_gflops"],
            "x_bandwidth_bound": r["median_ms"] / row["bandwidth_bound_ms"]}
        log(f"  {key:22s} median {r['median_ms']:9.3f} ms ({threads} thr)  IQR {r['iqr_ms']:7.3f}  "
            f"{row['variants'][key]['percent_of_sgemm_peak']:5.1f} % peak  {row['variants'][key]['x_bandwidth_bound']:6.1f}x bound")
    return row


def measure_memory(args) -> dict:
    """FF: peak bytes of simultaneously live values of the train_step program (liveness, nodes in the
    lowering's order). Backprop: torch autograd on the same widths, bytes autograd saves for
    backward + the gradients, in a fresh process (bench_ort.child_backprop)."""
    from ffcompile.compiler.onnx_emit import shipped_onnx

    model = B.load(MEMORY_MODEL)
    out = {"model": model.name, "how": {
        "ff": "liveness analysis: peak bytes of values live at once (node outputs; parameters, optimizer state "
              "and the batch not counted) in the emitted ONNX graph's node order, which onnxruntime follows (each "
              "layer's update right after its gradient); 'program_order': the same over the lowered program in "
              "the lowering's order (every update after every gradient)",
        "tvm": "the compiled TVM train_step (x86-cpu-tvm, the default backend of `ffcompile train` on x86): "
               "the most one call holds beyond its inputs by the compiler's static memory plan (storages live at "
               "once, plus a kernel's own workspace; the library's planned_working_bytes)",
        "backprop": "fresh process, torch autograd on nn.Sequential of the same widths (Linear+ReLU, Linear head), "
                    "cross entropy, SGD momentum: bytes of the storages autograd saves for backward "
                    "(saved_tensors_hooks; parameters and input excluded) + the parameter gradients"}, "rows": []}
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        for batch in (100, 1000):
            prog = B.program(model, "train_step", batch)
            ff_program = B.liveness_peak(prog, list(prog.nodes))["peak_bytes"]
            ff = B.onnx_liveness(shipped_onnx(prog))["peak_bytes"]
            tvm = compile_tvm(prog, "x86-cpu-tvm", args.threads, Path(tmp))[0].planned_working_bytes
            bp = B.run_child("backprop", MEMORY_MODEL, batch, args.threads, repeats=1)["saved_plus_gradients_bytes"]
            out["rows"].append({"batch": batch, "ff_working_bytes": ff, "ff_working_bytes_program_order": ff_program,
                                "tvm_working_bytes": tvm, "backprop_working_bytes": bp, "ff_over_backprop": ff / bp,
                                "tvm_over_backprop": tvm / bp})
            log(f"  memory batch {batch}: FF {ff / MiB:.1f} MiB (program order {ff_program / MiB:.1f}), TVM "
                f"{tvm / MiB:.1f} MiB, backprop {bp / MiB:.1f} MiB ({ff / bp:.2f}x, TVM {tvm / bp:.2f}x)")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="step.json")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--repeats-large", type=int, default=3, help="repeats at batch >= 1000")
    ap.add_argument("--sample-ms", type=float, default=250.0)
    ap.add_argument("--sizes", nargs="+", default=SIZES, choices=SIZES)
    ap.add_argument("--oracle-compile", nargs="*", default=["2x500/8"], choices=SIZES,
                    help="sizes at which torch.compile of the oracle is also timed")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile variants")
    ap.add_argument("--no-memory", action="store_true")
    args = ap.parse_args()
    import torch

    report = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "commit": B.commit(), "machine": B.cpu_info(),
              "threads": args.threads, "torch": torch.__version__, "load_before": B.machine_load(),
              "timing": (f"variants interleaved; each sample after a {B.SETTLE_S * 1e3:.0f} ms pause and one untimed "
                         "call; every variant repeats the step on one batch from the same weights (lr 0); the torch "
                         "steps and the TVM steps (donate=True) write their new state over the old, as in training")}
    log(f"load before: {report['load_before']['loadavg_1_5_15']}")
    report["peak"] = measure_peak(args.threads, 5)
    report["sizes"] = []
    with tempfile.TemporaryDirectory(prefix="bench-step-") as tmp:
        for size in args.sizes:
            report["sizes"].append(bench_size(size, args, report["peak"], Path(tmp)))
            Path(args.out).write_text(json.dumps(report, indent=1))  # partial results survive an interruption
    if not args.no_memory:
        report["memory"] = measure_memory(args)
    report["load_after"] = B.machine_load()
    log(f"load after: {report['load_after']['loadavg_1_5_15']}")
    Path(args.out).write_text(json.dumps(report, indent=1))
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
