"""Stopping a training run that diverged, and saying truthfully what it left behind.

Every step's scalar metrics (losses, goodness) are checked as they arrive; parameters and
optimizer state are checked before each checkpoint is written, so a checkpoint never holds a
NaN or inf. Only numpy: the on-device runtime uses it too.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..core.errors import FFCompileError


class DivergenceError(FFCompileError):
    pass


class RunInterrupted(FFCompileError):
    """Ctrl-C during training, with what was saved (the CLI exits 130)."""


def check_metrics(metrics: dict[str, float], step: int, epoch: int) -> None:
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if bad:
        raise DivergenceError(f"training diverged at step {step} (epoch {epoch + 1}): non-finite "
                              + ", ".join(f"{k} = {metrics[k]}" for k in bad[:4])
                              + (f" and {len(bad) - 4} more" if len(bad) > 4 else ""))


def check_tensors(tensors: dict[str, np.ndarray], what: str, step: int, epoch: int) -> None:
    for name, value in tensors.items():
        if not np.isfinite(value).all():
            raise DivergenceError(f"training diverged by step {step} (epoch {epoch + 1}): {what} {name} has "
                                  f"{int((~np.isfinite(value)).sum())} non-finite value(s)")


def what_is_kept(ckpt_path: Path, epoch: int | None) -> str:
    """``epoch``: the epoch of the checkpoint this run wrote or resumed from (None: none)."""
    if epoch is not None and Path(ckpt_path).is_file():
        return f"the last good checkpoint (epoch {epoch}) is kept at {ckpt_path}"
    return "no checkpoint was written"


def stopped(error: BaseException, ckpt_path: Path, epoch: int | None) -> FFCompileError:
    """The error to raise when a run stops in the middle: divergence or Ctrl-C."""
    kept = what_is_kept(ckpt_path, epoch)
    if isinstance(error, KeyboardInterrupt):
        resume = "; continue with --resume" if epoch is not None and Path(ckpt_path).is_file() else ""
        done = "" if resume else "no epoch was completed, "
        return RunInterrupted(f"interrupted: {done}{kept}{resume}")
    return DivergenceError(f"{error}; {kept} (lower the learning rate, or check the data)")
