"""The shared training loop's feeds: what each kind of model gets, drawn deterministically per
(seed, epoch), so the reference trainer and on-device fine-tuning see the same steps."""

import dataclasses
from pathlib import Path

import numpy as np

from ffcompile.data import shift_images
from ffcompile.loop.epochs import epoch_plan, run_epoch
from ffcompile.core.spec import load_model

MODELS = Path(__file__).parents[2] / "models"


def small(name: str, batch: int = 20):
    model = load_model(MODELS / f"{name}.toml")
    return dataclasses.replace(model, training=dataclasses.replace(model.training, batch_size=batch))


def recorded_feeds(model, x, y, epoch=0, seed=0, shift=None):
    seen = []

    def step_fn(params, state, feeds):
        seen.append({k: np.array(v, copy=True) for k, v in feeds.items()})
        return params, state, {}

    run_epoch(model, step_fn, {}, {}, x, y, epoch, 5, 0, seed, progress=False, shift=shift)
    return seen


def data(n=100):
    rng = np.random.default_rng(0)
    return rng.random((n, 784), dtype=np.float32), rng.integers(0, 10, n)


def test_supervised_feeds_and_draws_are_unchanged():
    """Label-negative models get exactly x, y, u, lr, step, from the same draws as before hybrid
    negatives existed: permutation, then uniforms, then jitter shifts."""
    x, y = data()
    model = small("mnist-jitter")
    feeds = recorded_feeds(model, x, y, epoch=1, seed=4, shift=shift_images)
    assert all(set(f) == {"x", "y", "u", "lr", "step"} for f in feeds)
    rng = np.random.default_rng([4, 1])
    order = rng.permutation(100).reshape(5, 20)
    u = rng.random((5, 20), dtype=np.float32)
    shifts = rng.integers(-2, 3, size=(5, 20, 2))
    plan = epoch_plan(model, 100, 1, 4)
    assert np.array_equal(plan.order, order) and np.array_equal(plan.u, u) and np.array_equal(plan.shifts, shifts)
    assert plan.partners is None and plan.packed_bits is None
    for k, f in enumerate(feeds):
        assert np.array_equal(f["x"], shift_images(x[order[k]], shifts[k, :, 0], shifts[k, :, 1]))
        assert np.array_equal(f["u"], u[k])


def test_jittered_runs_with_the_same_seed_see_the_same_shifts():
    """Both trainers (``ffcompile train`` and bundle fine-tuning) pass ``shift_images`` to this loop
    when training.jitter > 0, so equal seeds mean equal shifted batches."""
    x, y = data()
    model = small("mnist-jitter")
    first = recorded_feeds(model, x, y, seed=9, shift=shift_images)
    again = recorded_feeds(model, x, y, seed=9, shift=shift_images)
    other = recorded_feeds(model, x, y, seed=10, shift=shift_images)
    assert all(np.array_equal(a["x"], b["x"]) for a, b in zip(first, again))
    plan = epoch_plan(model, 100, 0, 9)
    assert not all(np.array_equal(f["x"], x[rows]) for f, rows in zip(first, plan.order))  # really shifted
    assert plan.shifts.min() == -2 and plan.shifts.max() == 2
    assert not all(np.array_equal(a["x"], b["x"]) for a, b in zip(first, other))


def test_hybrid_models_also_get_a_partner_digit_and_mask_bits():
    x, y = data()
    model = small("mnist-unsupervised")
    feeds = recorded_feeds(model, x, y, seed=2)
    plan = epoch_plan(model, 100, 0, 2, y)
    for k, f in enumerate(feeds):
        assert set(f) == {"x", "y", "u", "lr", "step", "x_other", "mask_bits"}
        assert np.array_equal(f["x_other"], x[plan.partners[k]])
        assert np.all(y[plan.partners[k]] != f["y"])
        assert f["mask_bits"].dtype == np.float32 and set(np.unique(f["mask_bits"])) == {0.0, 1.0}
    again = recorded_feeds(model, x, y, seed=2)
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(feeds, again) for k in a)


def test_jittered_hybrid_partner_moves_with_its_row():
    x, y = data()
    model = dataclasses.replace(small("mnist-unsupervised"), training=dataclasses.replace(
        small("mnist-unsupervised").training, jitter=2))
    feeds = recorded_feeds(model, x, y, seed=1, shift=shift_images)
    plan = epoch_plan(model, 100, 0, 1, y)
    s = plan.shifts[0]
    assert np.array_equal(feeds[0]["x_other"], shift_images(x[plan.partners[0]], s[:, 0], s[:, 1]))


def test_cooldown_at_epoch_middle_is_ffnew_gain():
    from ffcompile.loop.epochs import learning_rate

    for epochs in (60, 100):
        model = load_model(MODELS / "mnist-ffcode.toml")
        middle = dataclasses.replace(model, schedule=dataclasses.replace(model.schedule, at="epoch_middle"))
        lr = model.optimizer.lr
        for e in range(1, epochs + 1):  # ffnew.m's epoch, 1..E
            gain = 1.0 if e <= epochs / 2 else (1 + 2 * (epochs - e)) / epochs
            assert np.isclose(learning_rate(middle, e - 1, epochs), lr * gain), (epochs, e)
            # at the epoch's start, the cool-down runs 1/E above ffnew.m's through the second half
            start_gain = 1.0 if e <= epochs / 2 else 2 * (epochs - e + 1) / epochs
            assert np.isclose(learning_rate(model, e - 1, epochs), lr * start_gain), (epochs, e)
