"""The training loop of next-character models (sec. 4.1), independent of who runs the programs:
the reference trainer and a bundle on a device drive the same loop. numpy and tqdm only.

Data: ``x`` holds one-of-N contexts and ``y`` the next characters, string by string, ``per_string``
rows each; a string's first row is its first K characters (``ffcompile.data.text``).

An epoch, by ``training.phases``:

- ``together``: with self-generated negatives, first generate a negative row for every
  prediction from the current model (``generate_negatives``); then one pass of ``train_step``
  over shuffled minibatches (teacher-forced negatives are made inside the step).
- ``separate`` (negatives made "in a sleep phase"): a pass of ``train_positive``; then, from the
  *updated* model, new negatives and a pass of ``train_negative``. With one batch of all 22,320
  predictions this is the paper's second curve in figure 5.

Randomness: shuffles and the teacher-forcing uniforms from ``loop.epoch_plan``; the generation
uniforms from ``numpy.random.default_rng([seed, epoch, GENERATION, phase])``. Resuming at an
epoch boundary continues bit-identically.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from tqdm import tqdm

from .loop import epoch_plan, learning_rate, step_feeds, summarize
from .spec import Model

GENERATION = 41  # the generation stream's key in the per-epoch seed, apart from the epoch plan's

ProbsFn = Callable[[object, np.ndarray], np.ndarray]  # (params, one-hot rows) -> next-symbol probabilities


def sample(probs: np.ndarray, u: np.ndarray) -> np.ndarray:
    """One symbol per row, drawn from ``probs`` by inverse CDF with uniforms ``u`` in [0, 1)."""
    cdf = np.cumsum(np.asarray(probs, np.float64), axis=1)
    cdf /= cdf[:, -1:]
    return np.minimum((cdf <= u[:, None]).sum(axis=1), probs.shape[1] - 1)


def shift_in(rows: np.ndarray, symbols_: np.ndarray, n_symbols: int) -> np.ndarray:
    """The rows' contexts moved on by one character: drop the oldest code, append ``symbols_``."""
    out = np.zeros_like(rows)
    out[:, :-n_symbols] = rows[:, n_symbols:]
    out[np.arange(len(rows)), rows.shape[1] - n_symbols + symbols_] = 1.0
    return out


def generate_negatives(probs_fn: ProbsFn, params, x: np.ndarray, per_string: int, n_symbols: int,
                       rng: np.random.Generator) -> np.ndarray:
    """Negative rows from sequences the model generates itself, starting from each string's first
    K characters: row r of the result is the K-character string ending in the generated character
    at the position of prediction r (so it pairs with that prediction's positive row)."""
    if len(x) % per_string:
        raise ValueError(f"{len(x)} rows is not a whole number of strings of {per_string} predictions")
    strings = len(x) // per_string
    context = x[::per_string].copy()  # each string's first K characters
    out = np.empty((strings, per_string, x.shape[1]), np.float32)
    for t in range(per_string):
        made = sample(probs_fn(params, context), rng.random(strings))
        context = shift_in(context, made, n_symbols)
        out[:, t] = context
    return out.reshape(len(x), x.shape[1])


def perplexity(probs_fn: ProbsFn, params, x: np.ndarray, y: np.ndarray) -> float:
    """exp(mean negative log-probability of the true next character)."""
    probs = probs_fn(params, x)
    picked = np.maximum(probs[np.arange(len(y)), y].astype(np.float64), 1e-30)
    return float(np.exp(-np.mean(np.log(picked))))


def batched(run: Callable[[dict], dict], batch: int) -> Callable[[dict, np.ndarray], np.ndarray]:
    """A ProbsFn from a fixed-batch ``infer_softmax`` runner (feeds -> outputs): rows in chunks,
    the last one padded with zeros and the padding dropped."""

    def probs_fn(params, rows: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(rows), batch):
            chunk = rows[start:start + batch]
            pad = batch - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad, rows.shape[1]), rows.dtype)])
            out.append(np.asarray(run({**params, "x": chunk})["probs"])[:batch - pad])
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    return probs_fn


def run_sequence_epoch(model: Model, steps: dict, probs_fn: ProbsFn, params, state, x: np.ndarray, y: np.ndarray,
                       epoch: int, epochs: int, step: int, seed: int, per_string: int, progress: bool = True,
                       desc: str = "train", host_params: Callable | None = None):
    """One epoch. ``steps``: program name -> step function (params, state, feeds) -> (params,
    state, metrics); ``host_params(params)`` turns the step's params into what ``probs_fn`` takes
    (default: as they are). Returns (params, state, step, mean metrics)."""
    plan = epoch_plan(model, len(x), epoch, seed)
    lr = np.float32(learning_rate(model, epoch, epochs))
    n_symbols = model.input.label.classes
    as_host = host_params or (lambda p: p)
    generated = model.negatives.kind == "self_generated" and model.training.learn_hidden
    sums: dict[str, float] = {}

    def negatives(phase: int):
        rng = np.random.default_rng([seed, epoch, GENERATION, phase])
        return generate_negatives(probs_fn, as_host(params), x, per_string, n_symbols, rng)

    def one_pass(program: str, x_neg):
        nonlocal params, state, step
        bar = tqdm(range(len(plan.order)), desc=f"{desc} epoch {epoch + 1}/{epochs} {program}", leave=False,
                   disable=not progress, dynamic_ncols=True)
        for k in bar:
            step += 1
            feeds = step_feeds(plan, k, x, y, lr, step)
            if x_neg is not None:
                feeds["x_neg"] = x_neg[plan.order[k]]
            params, state, metrics = steps[program](params, state, feeds)
            for name, value in metrics.items():
                sums[name] = sums.get(name, 0.0) + value
        bar.close()

    if model.training.phases == "together":
        one_pass("train_step", negatives(0) if generated else None)
    else:
        one_pass("train_positive", None)
        one_pass("train_negative", negatives(1) if generated else None)
    return params, state, step, summarize(model, sums, len(plan.order))
