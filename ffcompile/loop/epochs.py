"""The FF training loop, independent of who runs the step: the PyTorch reference (``ffcompile
train``) and a compiled bundle on a device (``ffcompile finetune``) drive the same loop, so both
see the same batches, the same random draws and the same learning rates.

Everything random is drawn here, on the host, from ``numpy.random.default_rng([seed, epoch])``:
resuming at an epoch boundary continues bit-identically. Only numpy and tqdm are imported, so the
on-device runtime can use it without torch.

Feeds per step: ``x``, ``y``, ``u``, ``lr``, ``step``; models with hybrid-image negatives (sec. 3.2)
also get ``x_other`` (a digit of a different class for every row) and ``mask_bits`` (random 0/1
pixels that the program blurs into the mask). Step functions take the feeds their program needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from ..core.spec import Model
from .divergence import check_metrics

StepFn = Callable[[object, object, dict], tuple[object, object, dict]]
FEEDS = ("x", "y", "u", "lr", "step", "x_other", "mask_bits", "x_neg")


def learning_rate(model: Model, epoch: int, epochs: int) -> float:
    """Epoch-wise schedule: constant, or linear cool-down to 0 over the last part of training."""
    lr = model.optimizer.lr
    if model.schedule.kind == "constant" or epochs <= 0:
        return lr
    start = model.schedule.cooldown_start * epochs
    t = epoch + (0.5 if model.schedule.at == "epoch_middle" else 0.0)  # epoch counts from 0
    if t < start:
        return lr
    return lr * (epochs - t) / (epochs - start)


@dataclass
class EpochPlan:
    order: np.ndarray  # [steps, batch] row indices into the training set
    u: np.ndarray  # [steps, batch] uniforms in [0, 1) for negative sampling
    shifts: np.ndarray | None  # [steps, batch, 2] jitter (dx, dy) or None
    partners: np.ndarray | None = None  # [steps, batch] rows of a different class (hybrid negatives)
    packed_bits: np.ndarray | None = None  # [steps, batch, ceil(pixels / 8)] uint8 mask bits, packed

    def mask_bits(self, k: int, pixels: int) -> np.ndarray:
        """Step k's mask bits as float32 0/1 [batch, pixels]."""
        return np.unpackbits(self.packed_bits[k], axis=1, count=pixels).astype(np.float32)


def uses_hybrid_negatives(model: Model) -> bool:
    return model.negatives.kind == "hybrid_image"


def epoch_plan(model: Model, n: int, epoch: int, seed: int, labels: np.ndarray | None = None) -> EpochPlan:
    """A full epoch of shuffled batches; a last partial batch is dropped (static shapes). Models with
    hybrid negatives need the training ``labels`` to pick partners of a different class."""
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
    plan = EpochPlan(order, u, shifts)
    if uses_hybrid_negatives(model):  # drawn after everything else: other models' draws stay as they were
        if labels is None or len(labels) != n:
            raise ValueError("hybrid-image negatives need the labels of all training examples")
        plan.partners = different_label_partners(rng, np.asarray(labels))[order]
        plan.packed_bits = rng.integers(0, 256, size=(steps, batch, -(-model.input.size // 8)), dtype=np.uint8)
    return plan


def different_label_partners(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """For every row, the index of a row with a different label: walk a random permutation
    cyclically and pair each row with the first later row whose label differs (the start of the
    next run of equal labels). Always succeeds when there are at least two classes."""
    n = len(labels)
    perm = rng.permutation(n)
    walked = labels[perm]
    starts = np.flatnonzero(np.r_[True, walked[1:] != walked[:-1]])  # first position of each run
    if len(starts) < 2:
        raise ValueError("hybrid-image negatives need training examples of at least two classes")
    run_of = np.cumsum(np.r_[True, walked[1:] != walked[:-1]]) - 1  # run index of each position
    following = np.r_[starts[1:], starts[0]]  # start of the next run, cyclically
    if walked[starts[-1]] == walked[0]:
        following[-1] = starts[1]  # the last run wraps into a first run of its own label: skip it
    partners = np.empty(n, np.int64)
    partners[perm] = perm[following[run_of]]
    return partners


def step_feeds(plan: EpochPlan, k: int, x: np.ndarray, y: np.ndarray, lr, step: int,
               shift: Callable | None = None) -> dict[str, np.ndarray]:
    """The feeds of the plan's k-th step (``step`` is its 1-based global number)."""
    rows = plan.order[k]
    xb = x[rows]
    if plan.shifts is not None:
        xb = shift(xb, plan.shifts[k, :, 0], plan.shifts[k, :, 1])
    feeds = {"x": xb, "y": y[rows], "u": plan.u[k], "lr": np.float32(lr), "step": np.float32(step)}
    if plan.partners is not None:
        other = x[plan.partners[k]]
        if plan.shifts is not None:  # the partner digit moves with the row's own shift
            other = shift(other, plan.shifts[k, :, 0], plan.shifts[k, :, 1])
        feeds["x_other"] = other
        feeds["mask_bits"] = plan.mask_bits(k, x.shape[1])
    return feeds


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
    plan = epoch_plan(model, len(x), epoch, seed, y if uses_hybrid_negatives(model) else None)
    lr = np.float32(learning_rate(model, epoch, epochs))
    sums: dict[str, float] = {}
    bar = tqdm(range(len(plan.order)), desc=f"{desc} epoch {epoch + 1}/{epochs}", disable=not progress,
               leave=False, dynamic_ncols=True)
    for k in bar:
        step += 1
        params, state, metrics = step_fn(params, state, step_feeds(plan, k, x, y, lr, step, shift))
        check_metrics(metrics, step, epoch)
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


def epoch_line(record: dict) -> str:
    """One line per finished epoch: total FF loss, each layer's goodness separation, validation errors."""
    parts = [f"epoch {record['epoch']}"]
    losses = [v for k, v in record.items() if k.startswith("loss.") and k != "loss.softmax"]
    if losses:
        parts.append(f"ff loss {sum(losses):.4f}")
    for k, v in record.items():
        if k.startswith("separation."):
            parts.append(f"{k.split('.', 1)[1]} sep {v:.1f}")
        if k.startswith("val_error."):
            parts.append(f"val {k.split('.', 1)[1]} {v:.2f}%")
        if k.endswith("_perplexity"):
            parts.append(f"{k.split('_', 1)[0]} perplexity {v:.2f}")
    parts.append(f"{record['seconds']:.1f}s")
    return "  ".join(parts)
