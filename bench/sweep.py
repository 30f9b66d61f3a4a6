"""Run several configurations of a benchmark script side by side (e.g. on one GPU) and collect
their JSON results into one file. Each configuration is a list of ``--set section.field=value``
overrides; each run writes its own JSON and run directory, so an interrupted sweep loses nothing
that finished.

    python bench/sweep.py --script bench/bench_paper_supervised.py --out-dir sweep --parallel 4 \\
        --config base= --config wd0=regularizers.weight_decay=0.0 -- --device cuda --data-dir DIR
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--script", required=True)
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--config", action="append", required=True,
                    help="NAME=override[;override...] (empty after = means the spec as written)")
    ap.add_argument("rest", nargs=argparse.REMAINDER, help="arguments after -- go to every run")
    args = ap.parse_args()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rest = [a for a in args.rest if a != "--"]
    queue = []
    for item in args.config:
        name, _, overrides = item.partition("=")
        sets = [s for s in overrides.split(";") if s]
        cmd = [sys.executable, args.script, *rest, "--out", str(out_dir / f"{name}.json"),
               "--run-dir", str(out_dir / f"{name}.run"), *[f"--set={s}" for s in sets]]
        queue.append((name, cmd))
    running, results = [], {}
    while queue or running:
        while queue and len(running) < args.parallel:
            name, cmd = queue.pop(0)
            log = open(out_dir / f"{name}.log", "w")
            running.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), time.time()))
            print(f"started {name}: {' '.join(cmd)}", flush=True)
        for entry in list(running):
            name, proc, started = entry
            if proc.poll() is not None:
                running.remove(entry)
                path = out_dir / f"{name}.json"
                results[name] = json.loads(path.read_text()) if path.exists() else {"failed": proc.returncode}
                summary = {k: results[name].get(k) for k in ("test_error_percent", "epochs_to_1.5_percent_test_goodness", "failed")}
                print(f"finished {name} in {time.time() - started:.0f}s: {json.dumps(summary)}", flush=True)
        time.sleep(2)
    (out_dir / "sweep.json").write_text(json.dumps(
        {name: {k: v for k, v in r.items() if k != "history"} for name, r in results.items()}, indent=1))


if __name__ == "__main__":
    main()
