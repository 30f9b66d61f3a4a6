"""Writes the measured tables of docs/edge.md from bench_dtypes.py's JSON (between the
``dtypes-table`` markers), so that no number there is typed by hand.

    python bench/dtypes_page.py [--json docs/results/dtypes.json] [--page docs/edge.md] [--check]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- dtypes-table:start -->", "<!-- dtypes-table:end -->"
DTYPES = ("float32", "float16", "int8")


def mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def tables(report: dict) -> str:
    m = report["machine"]
    out = [f"Measured by `{report['benchmark']}` on {m['cpu']} ({m['cores']} cores); {report['data']}. "
           f"Latency: {report['notes']['latency']}, under the 1-minute load average shown. "
           f"{report['notes']['float16']}.", ""]
    out += ["| model (epochs) | readout | test error fp32 / fp16 / int8 | program size fp32 / fp16 / int8 "
            "| int8 size | latency batch 1, fp32 / int8 | batch 100, fp32 / int8 | int8 speed-up (1, 100) | load |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, run in report["runs"].items():
        for readout, r in run["readouts"].items():
            err = " / ".join(f"{r['test_error_percent'][d]:.2f} %" for d in DTYPES)
            size = " / ".join(mib(r["export_bytes"][d]) for d in DTYPES)
            lat = r["latency_ms"]
            out.append(f"| {name} ({run['epochs_trained']}) | {readout} | {err} | {size} | {r['int8_size_ratio']:.2f}× "
                       f"| {lat['batch_1']['float32']:.3f} / {lat['batch_1']['int8']:.3f} ms "
                       f"| {lat['batch_100']['float32']:.2f} / {lat['batch_100']['int8']:.2f} ms "
                       f"| {r['int8_speedup']['batch_1']:.2f}×, {r['int8_speedup']['batch_100']:.2f}× "
                       f"| {r['loadavg_1min_during'][0]:.1f} |")
    out += ["", "Whole x86-cpu bundles (the int8 one keeps the float32 weights and train step for fine-tuning):", "",
            "| model | float32 bundle | int8 bundle | inference needs (both readouts), float32 / int8 |", "|---|---|---|---|"]
    for name, run in report["runs"].items():
        b = run["x86_cpu_bundle_bytes"]
        out.append(f"| {name} | {mib(b['float32']['total'])} | {mib(b['int8']['total'])} "
                   f"| {mib(b['int8']['inference_float32'])} / {mib(b['int8']['inference_int8'])} |")
    emulated = {name: run["emulated_aarch64"] for name, run in report["runs"].items() if "emulated_aarch64" in run}
    commands = {run["command"] for run in report["runs"].values()}
    for name, emulated_run in emulated.items():
        commands.add(emulated_run.get("command", report["command"]))
        cost = {d: c for d, c in emulated_run.items() if d != "command"}
        phases = ("after_load", "after_inference", "after_finetuning")
        heap_note = f"; heap in use: {cost['int8']['heap_note']}" if "heap_note" in cost["int8"] else ""
        out += ["", f"{name} on the emulated aarch64 device (Cortex-A72 under qemu-user). Peak resident memory "
                    f"{cost['int8']['peak_rss_note']}{heap_note}:", "",
                "| bundle | peak resident memory after load / inference / fine-tuning | heap in use, same phases |",
                "|---|---|---|"]
        for d, c in cost.items():
            rss = " / ".join(f"{c['peak_rss_mib'][p]:.0f}" for p in phases)
            heap = " / ".join(f"{c['heap_in_use_mib'][p]:.1f}" for p in phases) if "heap_in_use_mib" in c else "–"
            out.append(f"| {d} | {rss} MiB | {heap} MiB |")
        out += ["", f"Instructions per call ({cost['int8']['instructions_note']}):", "",
                "| program | rows | instructions per call | per row |", "|---|---|---|---|"]
        out += [f"| {c['program']} | {c['rows']} | {c['instructions_per_call'] / 1e6:.2f} M | "
                f"{c['instructions_per_row'] / 1e3:.0f} k |" for c in cost["int8"]["instructions"]]
    for c in sorted(commands):
        out += ["", f"Command: `{c}`"]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=REPO / "docs/results/dtypes.json")
    ap.add_argument("--page", type=Path, default=REPO / "docs/edge.md")
    ap.add_argument("--check", action="store_true", help="exit 1 if the page is not what the JSON makes")
    args = ap.parse_args()
    page = args.page.read_text()
    body = f"{START}\n{tables(json.loads(args.json.read_text()))}\n{END}"
    new = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: body, page, flags=re.S)
    if args.check:
        return 0 if new == page else 1
    args.page.write_text(new)
    print(f"wrote {args.page}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
