#!/usr/bin/env python
"""docs/performance.md from bench_step.py's JSON files (one section each) and optionally
bench_train_epoch.py's, and the speed table in README.md (between the lines
``<!-- speed-table:start -->`` and ``<!-- speed-table:end -->``) from the first step file.

    python bench/report_step.py docs/results/step.json --epoch docs/results/train-epoch.json
    python bench/report_step.py ... --check      # exit 1 if the page or the README is out of date
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

COLUMNS = [("tvm", "TVM"), ("tvm_native", "TVM native"), ("ort", "ORT"), ("torch_hand_compiled", "torch.compile (hand)"),
           ("torch_hand", "hand-written torch"), ("torch_oracle", "autograd torch (oracle)"),
           ("torch_oracle_compiled", "torch.compile (oracle)"), ("interpreter", "interpreter")]
COMPILED = ("tvm", "tvm_native", "ort")
TORCH = ("torch_hand_compiled", "torch_hand", "torch_oracle", "torch_oracle_compiled")


def load_line(load: dict) -> str:
    return ", ".join(f"{x:.2f}" for x in load["loadavg_1_5_15"])


def against_torch(row: dict) -> tuple[str, float, str, float, float]:
    """(best compiled variant, its ms, fastest PyTorch variant, its ms, hand-written eager ms)."""
    return (*fastest(row, COMPILED), *fastest(row, TORCH), row["variants"]["torch_hand"]["median_ms"])


def at_commit(d: dict) -> str:
    c = d.get("commit")
    return f" at commit `{c['sha'][:10]}`{' with local changes' if c['dirty'] else ''}" if c else ""


def load_verdict(d: dict) -> str:
    """Whether other processes shared the cores: the 1-minute load during a size above the run's
    own threads (plus a margin for the load average's lag)."""
    loads = [max(row["loadavg_during"]) for row in d["sizes"] if row.get("loadavg_during")]
    if not loads:
        return "The load during the run was not recorded."
    busiest = max(loads)
    if busiest <= d["threads"] + 0.75:
        return (f"Nothing else ran (load at most {busiest:.1f} with the run's own {d['threads']} threads); variants "
                "were timed interleaved.")
    return (f"Other processes shared the cores (load up to {busiest:.1f} with the run's own {d['threads']} threads): "
            "absolute times are inflated and noisy; compare variants within a row (they were timed interleaved).")


def fastest(row: dict, keys) -> tuple[str, float]:
    found = [(k, row["variants"][k]["median_ms"]) for k in keys if k in row["variants"]]
    return min(found, key=lambda kv: kv[1])


def step_tables(d: dict) -> list[str]:
    peak = d["peak"]
    out = [f"Command: `{d['command']}`{at_commit(d)}  ",
           f"Machine: {d['machine'].get('model', '?')}, {d['machine']['cpus']} CPUs, {d['threads']} threads, "
           f"torch {d['torch']}.  ",
           f"Load average (1, 5, 15 min) before: {load_line(d['load_before'])}; after: "
           f"{load_line(d['load_after']) if 'load_after' in d else 'n/a (run interrupted)'}; during each size: "
           f"see the last column. {load_verdict(d)}  ",
           f"Measured in the same run: fp32 SGEMM peak **{peak['sgemm_peak_gflops']:.0f} GFLOP/s**, copy bandwidth "
           f"**{peak['copy_bandwidth_gbs']:.1f} GB/s** ({peak['how']}).", "",
           "### Median ms per train step", "",
           "| size | GFLOP | " + " | ".join(name for _, name in COLUMNS) + " | load avg during |",
           "|---|---|" + "---|" * len(COLUMNS) + "---|"]
    for row in d["sizes"]:
        cells = []
        best = fastest(row, COMPILED + TORCH)[0]
        for key, _ in COLUMNS:
            v = row["variants"].get(key)
            if v is None:
                cells.append("n/a" if "failed" not in row["notes"].get(key, "") else "failed")
            else:
                text = f"{v['median_ms']:.1f}" if v["median_ms"] >= 10 else f"{v['median_ms']:.2f}"
                cells.append(f"**{text}**" if key == best else text)
        load = row.get("loadavg_during")
        load_text = f"{load[0]:.1f} → {load[1]:.1f}" if load else "n/a"
        out.append(f"| {row['layers']}, batch {row['batch']} | {row['matmul_flops'] / 1e9:.2f} | " + " | ".join(cells)
                   + f" | {load_text} |")
    out += ["", "Bold: the fastest of all variants in the row. n/a: not run at that size (torch.compile of the oracle "
            "is timed only where `--oracle-compile` names the size; see the JSON's `notes`).", "",
            "### Against PyTorch and the machine's limits", "",
            "| size | best compiled | fastest PyTorch | compiled vs fastest PyTorch | compiled vs hand-written eager | "
            "% of SGEMM peak (best compiled) | bandwidth bound | best compiled ÷ bound |",
            "|---|---|---|---|---|---|---|---|"]
    for row in d["sizes"]:
        ck, cms, tk, tms, hand = against_torch(row)
        v = row["variants"][ck]
        out.append(f"| {row['layers']}, batch {row['batch']} | {ck} {cms:.2f} ms | {tk} {tms:.2f} ms | "
                   f"{tms / cms:.2f}x {'faster' if cms <= tms else '**slower**'} | {hand / cms:.2f}x | "
                   f"{v['percent_of_sgemm_peak']:.0f} % | {row['bandwidth_bound_ms']:.2f} ms | "
                   f"{v['x_bandwidth_bound']:.1f}x |")
    out += ["", "Bandwidth bound: " + d["sizes"][0]["bandwidth_bound_how"] + ". % of peak: the program's matmul "
            "FLOPs over its median time, against the SGEMM peak above.", "",
            "Compile times (s, first call for torch.compile): " + "; ".join(
                f"{r['size']}: " + ", ".join(f"{k} {v}" for k, v in r["compile_s"].items()) for r in d["sizes"]) + ".", "",
            "The hand-written step was checked against the compiled `train_step` once per size: largest relative "
            "difference " + ", ".join(f"{r['size']} {r['hand_step_check']['max_relative_difference']:.1e}"
                                      for r in d["sizes"]) + "."]
    out += limits_table(d)
    losses = [(row, fastest(row, COMPILED), fastest(row, TORCH)) for row in d["sizes"]]
    lost = [(row, c, t) for row, c, t in losses if c[1] > t[1]]
    out += ["", f"**Where we lose:** in {len(lost)} of {len(losses)} sizes the best compiled program is slower than the "
            "fastest PyTorch variant (" + "; ".join(f"{row['layers']}/{row['batch']}: {t[0]} {c[1] / t[1]:.2f}x faster"
                                                   for row, c, t in lost) + ")." if lost else
            "", "", "### The goals, checked on these numbers", ""] + goal_lines(d)
    if "memory" in d:
        m = d["memory"]
        out += ["", f"### Working memory of one step, {m['model']}", "",
                "| batch | FF train_step, onnxruntime graph | FF train_step, TVM | backprop (autograd) | onnxruntime ÷ backprop "
                "| TVM ÷ backprop |", "|---|---|---|---|---|---|"]
        for r in m["rows"]:
            tvm = (f"{r['tvm_working_bytes'] / 2**20:.1f} MiB", f"{r['tvm_over_backprop']:.2f}") if "tvm_working_bytes" in r else ("n/a", "n/a")
            out.append(f"| {r['batch']} | {r['ff_working_bytes'] / 2**20:.1f} MiB | {tvm[0]} | {r['backprop_working_bytes'] / 2**20:.1f} MiB "
                       f"| {r['ff_over_backprop']:.2f} | {tvm[1]} |")
        out += ["", f"onnxruntime graph: {m['how']['ff']}."] + ([f"TVM: {m['how']['tvm']}."] if "tvm" in m["how"] else []) + [
            f"Backprop: {m['how']['backprop']}."]
    return out


def at_peak_ms(d: dict, row: dict) -> float:
    """The step's matmul FLOPs at the run's SGEMM peak: no step can take less."""
    return row["matmul_flops"] / (d["peak"]["sgemm_peak_gflops"] * 1e9) * 1e3


def limits_table(d: dict) -> list[str]:
    """Per size, the least time the machine allows beside the best compiled step (rows of runs that
    measured the matmul products alone and the sweep bound)."""
    rows = [row for row in d["sizes"] if "matmul_products" in row and "sweep_bound_ms" in row]
    if not rows:
        return []
    out = ["", "### What the machine allows", "",
           "| size | matmul FLOPs at the SGEMM peak | the matmul products alone in torch.mm | best compiled | "
           "half of hand-written eager (the 2x goal) | bandwidth bound | sweep bound |",
           "|---|---|---|---|---|---|---|"]
    for row in rows:
        ck, cms, _, _, hand = against_torch(row)
        products = row["matmul_products"]
        out.append(f"| {row['layers']}, batch {row['batch']} | {at_peak_ms(d, row):.3g} ms | {products['median_ms']:.3g} ms "
                   f"({products['percent_of_sgemm_peak']:.0f} % of peak) | {cms:.3g} ms | {hand / 2:.3g} ms | "
                   f"{row['bandwidth_bound_ms']:.3g} ms | {row['sweep_bound_ms']:.3g} ms "
                   f"({row['sweep_bound_ms'] / row['bandwidth_bound_ms']:.2f}x the bandwidth bound) |")
    out += ["", "The matmul products alone: " + rows[0]["matmul_products"]["label"] + ", timed interleaved with the "
            "variants; each product as the step has it (shape and layout, a transposed operand as a transposed view). "
            "Sweep bound: " + rows[0]["sweep_bound_how"] + "."]
    return out


def out_of_reach(d: dict, row: dict, goal: str) -> str:
    """Why a missed goal cannot be met on this machine, where the run's own measurements show it."""
    ck, cms, _, _, hand = against_torch(row)
    if goal == "2x" and "sweep_bound_ms" in row:
        floor, what = max((at_peak_ms(d, row), "the step's matmul FLOPs alone take {} ms at the SGEMM peak"),
                          (row["sweep_bound_ms"], "the sweep bound is {} ms"))
        if floor > hand / 2:
            return f"; out of reach here: {what.format(f'{floor:.3g}')}, more than half of hand-written eager's {hand:.3g} ms"
        if row["matmul_products"]["median_ms"] > hand / 2:
            return (f"; the matmul products alone take {row['matmul_products']['median_ms']:.3g} ms in torch.mm, more than "
                    f"half of hand-written eager's {hand:.3g} ms")
    if goal == "peak" and "matmul_products" in row and row["matmul_products"]["percent_of_sgemm_peak"] < 85:
        return (f"; the matmul products alone run at {row['matmul_products']['percent_of_sgemm_peak']:.0f} % of the peak "
                "in torch.mm")
    if goal == "bandwidth" and "sweep_bound_ms" in row and row["sweep_bound_ms"] > 1.3 * row["bandwidth_bound_ms"]:
        return (f"; out of reach as defined: the forward passes' weight reads, which cannot share the update's sweep, "
                f"put the least time at {row['sweep_bound_ms'] / row['bandwidth_bound_ms']:.2f}x the bound")
    return ""


def goal_lines(d: dict) -> list[str]:
    out = []
    for row in d["sizes"]:
        ck, cms, tk, tms, hand = against_torch(row)
        where = f"{row['layers']}, batch {row['batch']}"
        verdict = []
        verdict.append(f"never slower than the fastest PyTorch: {'yes' if cms <= tms else f'**no** ({tk} is {cms / tms:.2f}x faster)'}")
        verdict.append(f">= 2x hand-written eager: " + ("yes" if hand / cms >= 2 else
                                                       f"**no** ({hand / cms:.2f}x{out_of_reach(d, row, '2x')})"))
        if row["layers"] == "4x2000" and row["batch"] == 100:
            pct = row["variants"][ck]["percent_of_sgemm_peak"]
            verdict.append(f">= 85 % of SGEMM peak: " + ("yes" if pct >= 85 else
                                                         f"**no** ({pct:.0f} %{out_of_reach(d, row, 'peak')})"))
        if row["layers"] == "2x500" and row["batch"] <= 16:
            ratio = row["variants"][ck]["x_bandwidth_bound"]
            if "copy_bandwidth_gbs_at_this_size" not in row:
                verdict.append("bandwidth bound not judged (this run's bound used the 256 MiB copy, not a copy of the "
                               "program's own, cache-resident, parameter and state size)")
            else:
                verdict.append("within 1.3x of the bandwidth bound: " + (
                    "yes" if ratio <= 1.3 else f"**no** ({ratio:.2f}x{out_of_reach(d, row, 'bandwidth')})"))
        out.append(f"- {where}: " + "; ".join(verdict) + ".")
    if "memory" in d:
        rows = d["memory"]["rows"]
        verdicts = []
        for key, name in (("ff_over_backprop", "the onnxruntime graph"), ("tvm_over_backprop", "TVM, the default training backend on x86")):
            if all(key in r for r in rows):
                worst = max(r[key] for r in rows)
                ratios = ", ".join(f"{r[key]:.2f}x at batch {r['batch']}" for r in rows)
                verdicts.append(f"{name}: {'yes' if worst <= 0.5 else '**no**'} ({ratios})")
        out.append("- FF working memory <= 0.5x backprop's at batch 100 and 1000: " + "; ".join(verdicts) + ".")
    return out


def epoch_table(e: dict) -> list[str]:
    out = ["", "## One epoch of mnist-supervised with `ffcompile train`", "",
           f"Command: `{e['command']}`{at_commit(e)}; {e['threads']} threads; load average before {load_line(e['load_before'])}, "
           f"after {load_line(e['load_after'])}.", "",
           "| backend | training loop (s) | s per step | start-up, compile, parity, validation, plots (s) | one epoch (s) |",
           "|---|---|---|---|---|"]
    for backend, s in e["summary"].items():
        loop = f"{s['median_train_loop_s']:.0f}"
        total = s["median_train_loop_s"] + s["median_other_s"]
        if "extrapolated_full_epoch_train_loop_s" in s:
            loop += f" ({e['limit']} images)"
            total = s["extrapolated_full_epoch_train_loop_s"] + s["median_other_s"]
        out.append(f"| {backend} | {loop} | {s['median_s_per_step']:.3f} | {s['median_other_s']:.0f} | "
                   f"{'**' + format(total, '.0f') + ' extrapolated**' if e['limit'] < 50000 else format(total, '.0f')} |")
    notes = {s["extrapolated_note"] for s in e["summary"].values() if "extrapolated_note" in s}
    out += [""] + [f"{n}; one epoch = extrapolated training loop + the rest as measured." for n in notes]
    out += ["Validation (10k images, both readouts) runs in the torch reference for every backend. `--backend "
            "torch` steps with the reference interpreter (TorchProgram); onnxruntime and tvm run the lowered step "
            "compiled for this CPU, after a parity check. Without `--backend`, `ffcompile train` picks tvm on x86-64 "
            "CPUs (`ffcompile.compiler.compiled_train.default_backend`)."]
    return out


STUDY = """## Where the compiled step loses its time

**What torch.compile does.** Inductor's code for the hand-written step (mnist-small, batch 8),
printed by `TORCH_LOGS=output_code` around `torch.compile(hand_step(model))`
(ffcompile/reference/hand_step.py): the GEMMs go to MKL (`extern_kernels.addmm` / `mm`), and
everything else is a handful of fused C++ loops: per layer, ReLU, the sum of squares, the sigmoid,
the local gradient, the peer-normalization mean, the bias gradient and the next layer's
normalization in one loop; and each parameter's whole Adam update (weight decay, m, v, bias
corrections, the parameter) in one pass right after its gradient GEMM, reading p, g, m, v and
writing p, m, v once: 8 fp32 accesses per weight.

**TVM.** The Relax module after legalization and fusion
(`ffcompile.compiler.tvm_build.lower_for_tuning`, its `main` listed) makes about a hundred kernel
calls for the same step. Each parameter's update is one kernel, as in inductor's code: a Relax
pass groups the elementwise producers of each parameter's new state before FuseOps (which alone
leaves m, v and the parameter in three kernels, since m and v are both step outputs and inputs
of the parameter's update), and the CPU rules compute the group in one loop nest, reading the
gradient and the old state once: 8 fp32 accesses per weight, counting the gradient GEMM's write.
The GEMM rule picks its register tile with a cost model (enough accumulators to hide the FMA
latency, loads per FMA, the L2 bytes per cycle of a panel larger than L1), runs fewer columns
than a vector on narrower vectors, and packs W a [16, 16] block at a time; `x @ W^T` with at most
4 rows reads W in place as dot products, several rows of W side by side so that their FMAs do not
wait on each other. The lowering multiplies the batch by the first layer's weights once per step
for all three passes (neutral, positive, negative), which differ only in the label's inputs
(docs/design.md); the hand-written PyTorch step, as users write it, does it three times. Last, each new parameter and optimizer state is written
over the old (`compiler/tvm_in_place.py`), so the memory-bound update touches one copy of the
state, as inductor's in-place loops do. A small batch's weight gradient (at most 64 rows) reads
its few rows in place while the threads split the output rows, so the update fused with it
streams whole rows of its state.

What is left. At batch 1000 the step is almost all matrix products, and the table "What the
machine allows" shows torch.mm running this step's products alone close to the SGEMM peak, with
torch.compile's step adding little to them. Our GEMM tile accumulates over the whole K with B's
panel in L2; a 2000-wide product runs level with MKL's where it is `x @ W^T`, and slower where B
is stored [K, N]. MKL's way beyond that is a K-blocked kernel with packed A panels and B's
micro-panel in L1, which would also take `g^T` as it is. A K-blocked TensorIR kernel of ours (C
accumulated in registers over each block of K and added into its tile, B's micro-panel of K x 80
prepacked) ran the 2000 x 2000 x 2000 product in 56-63 ms against 50-52 ms for our whole-K tile
and 44-46 ms for MKL, over block sizes of K 100-250 and of rows 50-200 (a probe, not kept). Our step instead writes g transposed
(scattered stores, well below the copy bandwidth), whole at batch 100 and a block of units at a
time at batch 1000 (see the working memory below): read in place as the GEMM's A, g walks a new
page every row and the GEMM ran slower. The per-row work of the wide layers (sums of squares,
the local gradient, the next layer's normalization) is about ten kernels of its own per layer,
where inductor fuses it into a few loops. The Adam update over 200 rows is a kernel of its own
(inside the GEMM's tiles, where the state's rows are read a tile's width at a time, it made the
step slower) and streams 28 bytes per weight; at batch 1000 it follows each block of units
inside the gradient's kernel. At batch 1-16, each layer's two forward passes and its update run at about
the copy bandwidth of their working set; the rest of the step is the VM's calls, about sixty
small kernels, and the Python call. Packing W once for both forward GEMMs of a layer was tried:
the GEMM on panels packed ahead ran no faster, as it then reads them from memory instead of L2.

**Working memory of the TVM step.** The Relax VM plans storage statically: a storage holds
every tensor that shares it over the step, at the largest one's size, from its first use to its
last, and a kernel that packs an operand whole allocates that copy while it runs. At batch 1000
the positive and negative pass's tensors are [2000, 2000], 16 MB each, and half of backprop's
working memory is less than three of them. A layer's input x and its output y are live while its
weight gradient `g = dz^T x` runs (y makes the next layer's input; `dz = s * y`, with s a scale
per row that can be 0). Written whole, dz^T, g and the GEMM's packed copy of x would each be a
third. So a weight gradient whose dz^T exceeds 4 MiB is one kernel with the parameter's update:
for each block of 500 units it writes that block of dz^T from the block's columns of y (whole
lines of each row), runs the block's GEMM with x packed per column block, and updates the
block's rows of the parameter. The price is a pass over x per block of units: about 2 % of the
step at batch 1000 in an interleaved comparison of whole steps. Reading y's columns in place as
the GEMM's A operand instead made the step 1.5x slower, as every k of the product reads a new
page of y. The softmax readout's features (layers 2-4 concatenated, as large as the three
together) are not written either: the logits sum the layers' products over the weight's column
slices, and the weight gradient concatenates the layers' products.

**Timing.** Worker threads spin for a while after their work (libgomp's behind torch, TVM's
pool) and stall the threads of whatever runs next on the same cores, for either framework: a
call timed right after the other framework's took longer than in a loop of its own calls. The
interleaved timing therefore pauses and makes one untimed call before each sample
(`bench_ort.SETTLE_S`). And a step repeated on one batch at the real learning rate drives the net
into saturation within tens of calls, where denormal gradients slow every backend's GEMMs
several-fold: every variant repeats the step from the same weights (lr 0).

**onnxruntime.** Its CPU provider runs one kernel per node. The GEMMs are MLAS's (the forward ones
as `FusedGemm` with the ReLU), but an optimizer update is a chain of about fifteen elementwise
nodes per weight (Adam) or seven (SGD with momentum); the emitter runs each chain tile by tile
inside a Scan so it stays in cache, yet the per-node passes over each tile still cost about as
much as the GEMMs at 4x2000, batch 100 (onnxruntime's own profile of the step:
`bench.bench_ort.ort_profile`).

The way forward: for onnxruntime, the update as one kernel (a custom operator shipped in the
bundle, or a contrib optimizer op where the runtime has one); for TVM, a K-blocked GEMM with
packed A panels (which also takes `g^T` without a transpose), the per-row work of each layer in
one or two kernels, and fewer kernels per step at small batches.
"""


START, END = "<!-- speed-table:start -->", "<!-- speed-table:end -->"
NAMES = dict(COLUMNS)


def readme_table(d: dict, command: str) -> list[str]:
    """The README's speed table: per size, the best compiled step against the fastest PyTorch."""
    quiet = load_verdict(d).startswith("Nothing else ran")
    out = [f"One FF train step, median ms, {d['threads']} threads on {d['machine'].get('model', '?')} "
           f"({'nothing else running' if quiet else 'shared with other processes'}); measured by `{d['command']}`, "
           f"tabled by `{command}`:", "",
           "| network, batch | best compiled | fastest PyTorch | hand-written PyTorch | compiled ÷ fastest PyTorch | % of SGEMM peak |",
           "|---|---|---|---|---|---|"]
    for row in d["sizes"]:
        ck, cms, tk, tms, hand = against_torch(row)
        ratio = f"{tms / cms:.2f}x " + ("faster" if cms <= tms else "**slower**")
        out.append(f"| {row['model']} ({row['layers']}), {row['batch']} | {NAMES[ck]} {cms:.3g} | {NAMES[tk]} {tms:.3g} | {hand:.3g} | "
                   f"{ratio} | {row['variants'][ck]['percent_of_sgemm_peak']:.0f} % |")
    if "memory" in d:
        rows = d["memory"]["rows"]
        ort_rows = ", ".join(f"{r['ff_over_backprop']:.2f}x at batch {r['batch']}" for r in rows)
        text = f"Working memory of a {d['memory']['model']} train step, against backprop's: onnxruntime graph {ort_rows}"
        if all("tvm_over_backprop" in r for r in rows):
            text += "; TVM " + ", ".join(f"{r['tvm_over_backprop']:.2f}x at batch {r['batch']}" for r in rows)
        out += ["", text + " ([docs/performance.md](docs/performance.md))."]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("steps", nargs="+", help="bench_step.py JSON files")
    ap.add_argument("--epoch", help="bench_train_epoch.py JSON")
    ap.add_argument("--page", default=str(REPO / "docs" / "performance.md"))
    ap.add_argument("--readme", default=str(REPO / "README.md"))
    ap.add_argument("--check", action="store_true", help="exit 1 if the page or the README differs from what it would write")
    args = ap.parse_args()
    missing = [f for f in [*args.steps, args.epoch, args.readme] if f and not Path(f).is_file()]
    if missing:
        sys.exit(f"report_step: no such file: {', '.join(missing)}")
    shown = " ".join([*args.steps, *(["--epoch", args.epoch] if args.epoch else [])])
    command = f"python bench/report_step.py {shown}"  # where it writes does not change what it writes
    lines = ["# Performance", "",
             f"Generated by `{command}` from the JSON the commands below wrote; do not edit by hand.", "",
             "## One FF train step against PyTorch as users write it", "",
             "Variants: **TVM** / **TVM native**: the compiled `train_step` for targets x86-cpu-tvm (portable "
             "x86-64-v3) and x86-cpu-tvm-native (this host's CPU); **ORT**: the same program in onnxruntime, as a "
             "bundle ships it; "
             "**hand-written torch**: ffcompile/reference/hand_step.py (addmm, closed-form local gradients, `torch._foreach` "
             "Adam, in place); **autograd torch**: ffcompile/reference/oracle.py (detach between layers, one backward per "
             "layer, torch.optim); **torch.compile** of those; **interpreter**: ffcompile's TorchProgram, a "
             "reference line, not PyTorch as a user writes it. Every torch variant is timed with the run's "
             "thread count and with 1 thread, interleaved with the rest, and keeps the faster (on an "
             "oversubscribed machine torch's per-op thread barriers can cost more than a second thread gains); "
             "the compiled programs run with the run's thread count only.", ""]
    steps = [json.load(open(path)) for path in args.steps]
    timing = {d["timing"] for d in steps if "timing" in d}
    if timing:
        lines += [f"Timing: {'; '.join(sorted(timing))}.", ""]
    for d in steps:
        lines += ["", f"## {d['threads']} thread{'s' if d['threads'] > 1 else ''}", ""] + step_tables(d)
    if args.epoch:
        lines += epoch_table(json.load(open(args.epoch)))
    lines += ["", STUDY]
    page = "\n".join(lines) + "\n"
    readme_path = Path(args.readme)
    readme = readme_path.read_text()
    if START not in readme or END not in readme:
        sys.exit(f"report_step: {readme_path} has no {START} ... {END} block")
    head, rest = readme.split(START, 1)
    new_readme = head + START + "\n" + "\n".join(readme_table(steps[0], command)) + "\n" + END + rest.split(END, 1)[1]
    page_path = Path(args.page)
    if args.check:
        stale = [str(p) for p, text in ((page_path, page), (readme_path, new_readme)) if p.read_text() != text]
        if stale:
            print(f"report_step: out of date: {', '.join(stale)}", file=sys.stderr)
            return 1
        return 0
    page_path.write_text(page)
    readme_path.write_text(new_readme)
    print(f"wrote {page_path} and the speed table in {readme_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
