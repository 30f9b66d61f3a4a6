"""Classification error of a readout program over a dataset, for any backend (torch-free).

Programs have a static batch; the last partial batch is padded with zeros and the padding's
predictions are discarded."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from tqdm import tqdm

RunFn = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def run_in_batches(run: RunFn, params: dict[str, np.ndarray], x: np.ndarray, batch: int, output: str,
                   progress=False, desc="eval") -> np.ndarray | None:
    """``output`` of a fixed-batch program over every row of ``x`` (None for no rows): rows in
    chunks of ``batch``, the last one padded with zeros and the padding's rows dropped."""
    parts = []
    for start in tqdm(range(0, len(x), batch), desc=desc, disable=not progress, leave=False):
        chunk = x[start:start + batch]
        n = len(chunk)
        if n < batch:
            chunk = np.concatenate([chunk, np.zeros((batch - n, x.shape[1]), x.dtype)])
        parts.append(np.asarray(run({**params, "x": chunk})[output])[:n])
    return np.concatenate(parts) if parts else None


def predict(run: RunFn, params: dict[str, np.ndarray], x: np.ndarray, batch: int, progress=False, desc="eval") -> np.ndarray:
    predictions = run_in_batches(run, params, x, batch, "prediction", progress, desc)
    return predictions if predictions is not None else np.zeros(0, np.int64)


def error_rate(run: RunFn, params, x, y, batch: int, progress=False, desc="eval") -> float:
    """Percent of rows misclassified."""
    return float(np.mean(predict(run, params, x, batch, progress, desc) != y) * 100.0)
