"""A paper run as a user runs it, recorded as JSON for the results page (bench/results_page.py).

Builds MODEL for a target with ``ffcompile build`` (fresh weights, parity-checked), trains it on
the device side with ``ffcompile finetune`` (resuming when WORK already holds part of the run),
then measures the official test error of every readout with ``ffcompile run``. The JSON holds
the spec, the commit, the exact commands, validation and test errors, the per-epoch curve, wall
time and the hardware. Nothing is tuned on the test set: validation is the held-out 10,000 of
the 60,000 training images (``finetune --split train``).

    python bench/paper_run.py models/mnist-ffcode.toml --data-dir DIR --work runs/paper/ffcode \\
        --out docs/results/mnist-ffcode.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ort import commit  # noqa: E402  (the checkout a result comes from)

# Test error goals (percent) and where they come from; a readout without a goal is reported only.
GOALS = {
    "mnist-ffcode": ({"goodness": 1.40}, "Hinton's ffcode as shipped: 1.44 % / 1.47 %; best public port 1.33 %"),
    "mnist-ffcode-middle": ({"goodness": 1.40}, "Hinton's ffcode as shipped: 1.44 % / 1.47 %; best public port 1.33 %"),
    "mnist-supervised": ({"goodness": 1.36}, "the paper, sec. 3.3"),
    "mnist-unsupervised": ({"softmax": 1.37}, "the paper, sec. 3.2"),
    "mnist-unsupervised-adam": ({"softmax": 1.37}, "the paper, sec. 3.2"),
    "mnist-local": ({"softmax": 1.16}, "the paper, sec. 3.2, footnote 8"),
    "mnist-jitter": ({"goodness": 0.70}, "the paper, sec. 3.3 (0.64 % after 500 epochs)"),
    "mnist-recurrent": ({"goodness": 1.31}, "the paper, sec. 3.4"),
}


def ffcompile(args: list[str], log) -> dict | None:
    """Runs one ffcompile command (recorded as typed), streaming its output to ``log``; returns
    its JSON when it prints one (``--json``)."""
    shown = "ffcompile " + shlex.join(args)
    print(f"$ {shown}", file=log, flush=True)
    out = subprocess.run([sys.executable, "-m", "ffcompile", *args], stdout=subprocess.PIPE, stderr=log, text=True)
    if out.returncode:
        sys.exit(f"paper_run: `{shown}` failed with exit code {out.returncode} (see its output above)")
    log.write(out.stdout if "--json" not in args else "")
    return json.loads(out.stdout) if "--json" in args else None


def hardware() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": cpu, "cores": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()}


def built_at(work: Path) -> dict:
    """The commit the run's bundle was built from, recorded when it was built (None for a work
    folder without that record: the report then names the commit it was made at)."""
    path = work / "built_at.json"
    return json.loads(path.read_text()) if path.exists() else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="model spec (models/*.toml)")
    ap.add_argument("--target", default="x86-cpu-tvm", help="compilation target (default: x86-cpu-tvm)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs (default: the spec's training.epochs)")
    ap.add_argument("--data-dir", default=os.environ.get("FFCOMPILE_DATA_DIR"), help="full MNIST (IDX .gz files)")
    ap.add_argument("--work", type=Path, required=True, help="folder for the bundle and the run (resumable)")
    ap.add_argument("--out", type=Path, required=True, help="result JSON")
    ap.add_argument("--report-only", action="store_true",
                    help="train nothing: report the run in WORK as far as it got (its last checkpoint's test error)")
    args = ap.parse_args()
    if not args.data_dir:
        sys.exit("paper_run: give --data-dir (or set FFCOMPILE_DATA_DIR): paper runs use the full MNIST")

    sys.path.insert(0, str(REPO))
    from ffcompile.core.family import readouts_of
    from ffcompile.core.spec import load_model

    model = load_model(args.model)
    epochs = args.epochs or model.training.epochs
    bundle, run = args.work / "bundle", args.work / "run"
    args.work.mkdir(parents=True, exist_ok=True)
    commands = [["build", str(args.model), "--target", args.target, "-o", str(bundle)],
                ["finetune", str(bundle), "--epochs", str(epochs), "--out", str(run), "--data-dir", args.data_dir,
                 "--no-progress"]]
    with open(args.work / "log.txt", "a") as log:
        if not (bundle / "manifest.json").exists() and not args.report_only:
            (args.work / "built_at.json").write_text(json.dumps(commit()) + "\n")
            ffcompile(commands[0], log)
        done = json.loads((run / "metrics.json").read_text())["epochs"] if (run / "metrics.json").exists() else []
        if not done and args.report_only:
            sys.exit(f"paper_run: {run} has no completed epoch to report")
        if len(done) < epochs and not args.report_only:
            ffcompile(commands[1] + (["--resume"] if done else []), log)
        test = {}
        for readout in readouts_of(model):  # an unsupervised net has the softmax readout only
            command = ["run", str(bundle), "--weights", str(run / "checkpoint.safetensors"), "--data-dir", args.data_dir,
                       "--split", "test", "--readout", readout, "--json"]
            report = ffcompile(command, log)
            if readout in report["readouts"]:
                test[readout] = report["readouts"][readout]["error_percent"]
                commands.append(command)
    metrics = json.loads((run / "metrics.json").read_text())
    history = metrics["epochs"]
    goal, goal_source = GOALS.get(model.name, ({}, None))
    built = built_at(args.work)
    result = {
        "model": model.name, "spec": str(args.model), "spec_json": model.to_json(), "target": args.target,
        "commit": built or commit(), "commit_when": "build" if built else "report",
        "date": datetime.date.today().isoformat(),
        "commands": ["ffcompile " + shlex.join(c) for c in commands],
        "epochs": epochs, "epochs_done": len(history),
        "val_error_percent": {r: history[-1].get(f"val_error.{r}") for r in test},
        "test_error_percent": test,
        "goal_test_error_percent": goal, "goal_source": goal_source,
        "meets_goal": all(test.get(r, 100.0) <= v for r, v in goal.items()) if goal else None,
        "train_seconds": round(sum(r["seconds"] for r in history), 1),
        "hardware": hardware(), "history": history,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("model", "epochs_done", "val_error_percent", "test_error_percent",
                                              "goal_test_error_percent", "meets_goal", "train_seconds")}))


if __name__ == "__main__":
    main()
