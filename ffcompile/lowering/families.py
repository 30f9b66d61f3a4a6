"""The one program dispatcher: a model's family picks the lowering that builds its programs."""

from __future__ import annotations

from ..core.builder import Builder
from ..core.errors import FFCompileError
from ..core.family import Family
from ..core.program import Program
from ..core.spec import Model
from . import feedforward, nextchar, recurrent

LOWERINGS = {Family.FEED_FORWARD: feedforward, Family.RECURRENT: recurrent, Family.NEXT_CHARACTER: nextchar}


def build_program(model: Model, name: str, batch: int) -> Program:
    """Program ``name`` of ``model`` at a static batch size."""
    if batch <= 0:
        raise FFCompileError(f"batch size must be positive, got {batch}")
    b = Builder(name)
    LOWERINGS[model.family].build(b, model, name, batch)
    return b.build()


def build_stage_program(model: Model, name: str, batch: int, layers: range) -> Program:
    """Program ``name`` (``feedforward.STAGE_PROGRAMS``) of the pipeline stage that owns ``layers``
    (``pipeline_stages``) of a feed-forward model, at a static micro-batch size."""
    if model.family is not Family.FEED_FORWARD:
        raise FFCompileError(f"model {model.name!r}: layer-pipelined training supports feed-forward models; "
                             f"this one is {model.family.value}")
    if batch <= 0:
        raise FFCompileError(f"batch size must be positive, got {batch}")
    b = Builder(f"{name}[{layers.start}:{layers.stop}]")
    feedforward.build_stage(b, model, name, batch, layers)
    return b.build()


def negative_probs_program(model: Model) -> str | None:
    """The program whose ``probs`` output holds the class probabilities ``train_step`` draws
    hard-label (or teacher-forced) negatives from (None for other negatives)."""
    if model.negatives.kind == "teacher_forcing" and model.training.learn_hidden:
        return "infer_softmax"
    if model.negatives.kind != "hard_label":
        return None
    return "negative_probs" if model.family is Family.RECURRENT else "infer_softmax"
