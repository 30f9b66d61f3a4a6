"""The FF training loop, independent of who runs the step: the PyTorch reference (``ffcompile
train``) and a compiled bundle on a device (``ffcompile finetune``) drive the same loop, so both
see the same batches, the same random draws and the same learning rates.

Everything random is drawn here, on the host, from ``numpy.random.default_rng([seed, epoch])``:
resuming at an epoch boundary continues bit-identically. Only numpy and tqdm are imported, so the
on-device runtime can use it without torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from .spec import Model

StepFn = Callable[[object, object, dict], tuple[object, object, dict]]


def learning_rate(model: Model, epoch: int, epochs: int) -> float:
    """Epoch-wise schedule: constant, or linear cool-down to 0 over the last part of training."""
    lr = model.optimizer.lr
    if model.schedule.kind == "constant" or epochs <= 0:
        return lr
    start = model.schedule.cooldown_start * epochs
    if epoch < start:
        return lr
    return lr * (epochs - epoch) / (epochs - start)


@dataclass
class EpochPlan:
    order: np.ndarray  # [steps, batch] row indices into the training set
    u: np.ndarray  # [steps, batch] uniforms in [0, 1) for negative sampling
    shifts: np.ndarray | None  # [steps, batch, 2] jitter (dx, dy) or None


def epoch_plan(model: Model, n: int, epoch: int, seed: int) -> EpochPlan:
    """A full epoch of shuffled batches; a last partial batch is dropped (static shapes)."""
    batch = model.training.batch_size
    steps = n // batch
    if steps == 0:
        raise ValueError(f"{n} training examples is less than one batch of {batch}")
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n)[: steps * batch].reshape(steps, batch)
    u = rng.random((steps, batch), dtype=np.float32)
    shifts = None
    if model.training.jitter:
        j = model.training.jitter
        shifts = rng.integers(-j, j + 1, size=(steps, batch, 2))
    return EpochPlan(order, u, shifts)


def summarize(model: Model, sums: dict[str, float], count: int) -> dict[str, float]:
    """Mean metrics over an epoch, plus each layer's goodness separation (pos - neg)."""
    out = {k: v / max(count, 1) for k, v in sums.items()}
    for layer in model.layers:
        pos, neg = out.get(f"goodness_pos.{layer.name}"), out.get(f"goodness_neg.{layer.name}")
        if pos is not None and neg is not None:
            out[f"separation.{layer.name}"] = pos - neg
    return out


def run_epoch(model: Model, step_fn: StepFn, params, state, x: np.ndarray, y: np.ndarray, epoch: int,
              epochs: int, step: int, seed: int, progress: bool = True, desc: str = "train",
              shift: Callable | None = None):
    """One epoch. Returns (params, state, step, mean metrics)."""
    plan = epoch_plan(model, len(x), epoch, seed)
    lr = np.float32(learning_rate(model, epoch, epochs))
    sums: dict[str, float] = {}
    bar = tqdm(range(len(plan.order)), desc=f"{desc} epoch {epoch + 1}/{epochs}", disable=not progress,
               leave=False, dynamic_ncols=True)
    for k in bar:
        rows = plan.order[k]
        xb = x[rows]
        if plan.shifts is not None:
            xb = shift(xb, plan.shifts[k, :, 0], plan.shifts[k, :, 1])
        step += 1
        feeds = {"x": xb, "y": y[rows], "u": plan.u[k], "lr": lr, "step": np.float32(step)}
        params, state, metrics = step_fn(params, state, feeds)
        for name, value in metrics.items():
            sums[name] = sums.get(name, 0.0) + value
        if progress and (k % 10 == 0 or k == len(plan.order) - 1):
            bar.set_postfix_str(_postfix(model, sums, k + 1))
    bar.close()
    return params, state, step, summarize(model, sums, len(plan.order))


def _postfix(model: Model, sums: dict[str, float], count: int) -> str:
    parts = [f"loss {sum(v for k, v in sums.items() if k.startswith('loss.') and k != 'loss.softmax') / count:.3f}"]
    for layer in model.layers:
        pos, neg = sums.get(f"goodness_pos.{layer.name}"), sums.get(f"goodness_neg.{layer.name}")
        if pos is not None:
            parts.append(f"{layer.name} sep {(pos - neg) / count:.1f}")
    return " ".join(parts)
