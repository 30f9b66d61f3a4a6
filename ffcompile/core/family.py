"""Model families: the kind of network a model is, decided once from its spec (``model.family``).

- **feed-forward** (sec. 3.1-3.3): a stack of dense or local layers over an image, the label
  (if any) in the input; one ``train_step`` per minibatch.
- **recurrent** (sec. 3.4): the image at the bottom, a one-of-N label layer on top, hidden layers
  between, unrolled over time; always read out by goodness.
- **next-character** (sec. 4.1): contexts of previous characters in, the next character out; the
  training loop walks whole strings and may generate its own negatives.

Code that behaves differently per family asks the family, never the data set name. The names of
the programs a bundle carries live here too: the compiler builds them and the runtime runs them.
"""

from __future__ import annotations

import enum


class Family(enum.Enum):
    FEED_FORWARD = "feed-forward"
    RECURRENT = "recurrent"
    NEXT_CHARACTER = "next-character"

    @property
    def predicts_characters(self) -> bool:
        """Data are strings of characters: perplexity is reported, text can be generated, and the
        training loop walks whole strings."""
        return self is Family.NEXT_CHARACTER


def family_of(model) -> Family:
    if model.input.dataset == "text":
        return Family.NEXT_CHARACTER
    if model.recurrent is not None:
        return Family.RECURRENT
    return Family.FEED_FORWARD


READOUT_PROGRAMS = {"goodness": "infer_goodness", "softmax": "infer_softmax"}


def readouts_of(model) -> list[str]:
    """The readouts a model has (keys of ``READOUT_PROGRAMS``). A recurrent net always reads out by
    goodness (all hidden layers when ``readout.goodness_layers`` is empty)."""
    has = {"goodness": bool(model.readout.goodness_layers) or model.family is Family.RECURRENT,
           "softmax": bool(model.readout.softmax_layers)}
    return [r for r in READOUT_PROGRAMS if has[r]]


def train_programs(model) -> list[str]:
    """The training programs a bundle carries: ``train_step``, and for next-character models that
    learn their hidden layers the positive-only and negative-only halves (sec. 4.1's sleep phase)."""
    if model.family.predicts_characters and model.training.learn_hidden:
        return ["train_step", "train_positive", "train_negative"]
    return ["train_step"]


def bundle_programs(model) -> list[str]:
    """Every program a bundle of ``model`` carries: the training programs, then the readouts."""
    return train_programs(model) + [READOUT_PROGRAMS[r] for r in readouts_of(model)]


def is_train_program(name: str) -> bool:
    return name.startswith("train_")
