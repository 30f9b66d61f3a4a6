"""One epoch of the loop a model's family needs: ``epochs.run_epoch`` for image models,
``nextchar.run_sequence_epoch`` for next-character models."""

from __future__ import annotations

from collections.abc import Callable

from ..core.spec import Model
from ..data.augment import shift_images
from ..data.text import PREDICTIONS
from .epochs import run_epoch
from .nextchar import check_whole_strings, run_sequence_epoch


def epoch_runner(model: Model, steps: dict, seed: int, progress: bool = True, desc: str = "train",
                 probs_fn: Callable | None = None, host_params: Callable | None = None):
    """One epoch of the loop the model's kind needs, as ``(params, state, x, y, epoch, epochs,
    step) -> (params, state, step, mean metrics)``, driving ``steps`` (program name -> step
    function): ``run_epoch`` with ``train_step``, or for next-character models
    ``nextchar.run_sequence_epoch``, which also generates with ``probs_fn`` (see there)."""
    if not model.family.predicts_characters:
        shift = shift_images if model.training.jitter else None

        def epoch_fn(params, state, x, y, epoch, epochs, step):
            return run_epoch(model, steps["train_step"], params, state, x, y, epoch, epochs, step, seed, progress,
                             desc=desc, shift=shift)
        return epoch_fn

    def epoch_fn(params, state, x, y, epoch, epochs, step):
        check_whole_strings(len(x), PREDICTIONS)
        return run_sequence_epoch(model, steps, probs_fn, params, state, x, y, epoch, epochs, step, seed, PREDICTIONS,
                                  progress, desc=desc, host_params=host_params)
    return epoch_fn
