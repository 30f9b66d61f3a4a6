"""Summarize every metrics.json under a folder: per run, epochs done and the last and best
validation/test error of each readout. Writes JSON to stdout."""

import json
import sys
from pathlib import Path

summary = {}
for path in sorted(Path(sys.argv[1]).rglob("metrics.json")):
    epochs = json.loads(path.read_text())["epochs"]
    keys = sorted({k for r in epochs for k in r if "_error." in k})
    summary[str(path.parent.relative_to(sys.argv[1]))] = {
        "epochs_done": epochs[-1]["epoch"] if epochs else 0,
        "seconds_per_epoch": round(sum(r["seconds"] for r in epochs) / max(len(epochs), 1), 2),
        "last": {k: epochs[-1].get(k) for k in keys},
        "best": {k: min(r[k] for r in epochs if k in r) for k in keys},
    }
print(json.dumps(summary, indent=1))
