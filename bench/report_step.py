#!/usr/bin/env python
"""Markdown speed tables from bench_step.py's JSON files (one section each) and optionally
bench_train_epoch.py's.

    python bench/report_step.py step.json [step_1thread.json ...] [--epoch train_epoch.json] > docs/performance.md
"""

from __future__ import annotations

import argparse
import json
import sys

COLUMNS = [("tvm", "TVM"), ("tvm_native", "TVM native"), ("ort", "ORT"), ("torch_hand_compiled", "torch.compile (hand)"),
           ("torch_hand", "hand-written torch"), ("torch_oracle", "autograd torch (oracle)"),
           ("torch_oracle_compiled", "torch.compile (oracle)"), ("interpreter", "interpreter")]
COMPILED = ("tvm", "tvm_native", "ort")
TORCH = ("torch_hand_compiled", "torch_hand", "torch_oracle", "torch_oracle_compiled")


def load_line(load: dict) -> str:
    return ", ".join(f"{x:.2f}" for x in load["loadavg_1_5_15"])


def fastest(row: dict, keys) -> tuple[str, float]:
    found = [(k, row["variants"][k]["median_ms"]) for k in keys if k in row["variants"]]
    return min(found, key=lambda kv: kv[1])


def step_tables(d: dict) -> list[str]:
    peak = d["peak"]
    out = [f"Command: `{d['command']}`  ",
           f"Machine: {d['machine'].get('model', '?')}, {d['machine']['cpus']} CPUs, {d['threads']} threads, "
           f"torch {d['torch']}.  ",
           f"Load average (1, 5, 15 min) before: {load_line(d['load_before'])}; after: "
           f"{load_line(d['load_after']) if 'load_after' in d else 'n/a (run interrupted)'}; during each size: "
           "see the last column. The machine's 2 cores were shared with other processes during the run: "
           "absolute times are inflated and noisy; compare variants within a row (they were timed interleaved).  ",
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
        ck, cms = fastest(row, COMPILED)
        tk, tms = fastest(row, TORCH)
        hand = row["variants"]["torch_hand"]["median_ms"]
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
    losses = [(row, fastest(row, COMPILED), fastest(row, TORCH)) for row in d["sizes"]]
    lost = [(row, c, t) for row, c, t in losses if c[1] > t[1]]
    out += ["", f"**Where we lose:** in {len(lost)} of {len(losses)} sizes the best compiled program is slower than the "
            "fastest PyTorch variant (" + "; ".join(f"{row['layers']}/{row['batch']}: {t[0]} {c[1] / t[1]:.2f}x faster"
                                                   for row, c, t in lost) + ")." if lost else
            "", "### Goals of issue 21, checked on these numbers", ""] + goal_lines(d)
    if "memory" in d:
        m = d["memory"]
        out += ["", f"### Working memory of one step, {m['model']}", "",
                "| batch | FF train_step | backprop (autograd) | FF ÷ backprop |", "|---|---|---|---|"]
        for r in m["rows"]:
            out.append(f"| {r['batch']} | {r['ff_working_bytes'] / 2**20:.1f} MiB | {r['backprop_working_bytes'] / 2**20:.1f} MiB "
                       f"| {r['ff_over_backprop']:.2f} |")
        out += ["", f"FF: {m['how']['ff']}. Backprop: {m['how']['backprop']}."]
    return out


def goal_lines(d: dict) -> list[str]:
    out = []
    for row in d["sizes"]:
        ck, cms = fastest(row, COMPILED)
        tk, tms = fastest(row, TORCH)
        hand = row["variants"]["torch_hand"]["median_ms"]
        where = f"{row['layers']}, batch {row['batch']}"
        verdict = []
        verdict.append(f"never slower than the fastest PyTorch: {'yes' if cms <= tms else f'**no** ({tk} is {cms / tms:.2f}x faster)'}")
        verdict.append(f">= 2x hand-written eager: {'yes' if hand / cms >= 2 else f'**no** ({hand / cms:.2f}x)'}")
        if row["layers"] == "4x2000" and row["batch"] == 100:
            pct = row["variants"][ck]["percent_of_sgemm_peak"]
            verdict.append(f">= 85 % of SGEMM peak: {'yes' if pct >= 85 else f'**no** ({pct:.0f} %)'}")
        if row["layers"] == "2x500" and row["batch"] <= 16:
            ratio = row["variants"][ck]["x_bandwidth_bound"]
            if "copy_bandwidth_gbs_at_this_size" not in row:
                verdict.append("bandwidth bound not judged (this run's bound used the 256 MiB copy, not a copy of the "
                               "program's own, cache-resident, parameter and state size)")
            else:
                verdict.append(f"within 1.3x of the bandwidth bound: {'yes' if ratio <= 1.3 else f'**no** ({ratio:.2f}x)'}")
        out.append(f"- {where}: " + "; ".join(verdict) + ".")
    if "memory" in d:
        worst = max(r["ff_over_backprop"] for r in d["memory"]["rows"])
        out.append(f"- FF working memory <= 0.5x backprop's at batch 100 and 1000: {'yes' if worst <= 0.5 else '**no**'} "
                   f"(largest ratio {worst:.2f}).")
    return out


def epoch_table(e: dict) -> list[str]:
    out = ["", "## One epoch of mnist-supervised with `ffcompile train`", "",
           f"Command: `{e['command']}`; {e['threads']} threads; load average before {load_line(e['load_before'])}, "
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
    out += ["Validation (10k images, both readouts) runs in the torch reference for every backend; the torch "
            "backend's training step is the reference interpreter (TorchProgram), which is what `ffcompile train "
            "--backend torch` runs."]
    return out


STUDY = """## What torch.compile does at edge sizes, and what our TVM step does instead

Inductor's code for the hand-written step (mnist-small, batch 8), printed by
`TORCH_LOGS=output_code python -c "..."` running `torch.compile(hand_step(model))` once (ffcompile/reference/hand_step.py):
9 GEMMs go to MKL (`extern_kernels.addmm` / `mm`), and everything else is 9 fused C++ loops plus one
`cumsum`: the label embedding and input normalization in one loop; ReLU, the sum of squares, the
sigmoid, the local gradient, the peer-normalization mean, the bias gradient and the next layer's
normalization in one loop per layer; and **each parameter's whole Adam update (weight decay, m, v,
bias corrections, the parameter) in one pass right after its gradient GEMM**, reading p, g, m, v
and writing p, m, v once: 8 fp32 accesses per weight, the gradient included.

Our TVM `train_step` for the same net (the Relax module after legalization and fusion,
`ffcompile.compiler.tvm_build.lower_for_tuning`, its `main` listed) makes 113 kernel calls. Each
weight's gradient GEMM carries the weight decay in its epilogue (reads W, writes g), then three
separate elementwise kernels update v (reads g, v; writes v), m (reads m, g; writes m) and the
parameter (reads m, v, p; writes p): 12 fp32 accesses per weight. Relax's FuseOps fuses along
single-consumer chains; m and v are outputs of the step and inputs of the parameter update, so the
three are not merged into one multi-output kernel. At batch 1-16, where a step does little
arithmetic, both costs show: 113 kernel calls (each a VM call and a thread-pool launch) against
inductor's 19, and 12 memory accesses per weight against 8. The next step is a multi-output Adam kernel (one TIR function
writing p, m, v from p, g, m, v; the weight-decay term moved out of the GEMM epilogue), and fewer,
larger kernels for the per-row work of the small layers.
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("steps", nargs="+", help="bench_step.py JSON files")
    ap.add_argument("--epoch", help="bench_train_epoch.py JSON")
    args = ap.parse_args()
    lines = ["# Performance", "",
             "Generated by `python bench/report_step.py " + " ".join(sys.argv[1:]) + "` from the JSON the commands "
             "below wrote; do not edit by hand.", "",
             "## One FF train step against PyTorch as users write it", "",
             "Variants: **TVM** / **TVM native**: the compiled `train_step` for targets x86-cpu-tvm (portable "
             "x86-64-v3) and x86-cpu-tvm-native (this host's CPU); **ORT**: the same program in onnxruntime; "
             "**hand-written torch**: ffcompile/reference/hand_step.py (addmm, closed-form local gradients, `torch._foreach` "
             "Adam, in place); **autograd torch**: ffcompile/reference/oracle.py (detach between layers, one backward per "
             "layer, torch.optim); **torch.compile** of those; **interpreter**: ffcompile's TorchProgram, a "
             "reference line, not PyTorch as a user writes it. Every torch variant is timed with the run's "
             "thread count and with 1 thread, interleaved with the rest, and keeps the faster (on an "
             "oversubscribed machine torch's per-op thread barriers can cost more than a second thread gains); "
             "the compiled programs run with the run's thread count only.", ""]
    for path in args.steps:
        d = json.load(open(path))
        lines += ["", f"## {d['threads']} thread{'s' if d['threads'] > 1 else ''}", ""] + step_tables(d)
    if args.epoch:
        lines += epoch_table(json.load(open(args.epoch)))
    lines += ["", STUDY]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
