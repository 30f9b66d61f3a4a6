"""The model family is decided once from the spec, and names the programs a bundle carries."""

import dataclasses
from pathlib import Path

import pytest

from ffcompile.core.family import Family, bundle_programs, readouts_of
from ffcompile.core.spec import load_model

MODELS = Path(__file__).resolve().parents[2] / "models"


@pytest.mark.parametrize("name,family,programs", [
    ("mnist-small", Family.FEED_FORWARD, ["train_step", "infer_goodness", "infer_softmax"]),
    ("mnist-unsupervised", Family.FEED_FORWARD, ["train_step", "infer_softmax"]),
    ("mnist-recurrent", Family.RECURRENT, ["train_step", "infer_goodness"]),
    ("cifar-local-2", Family.RECURRENT, ["train_step", "infer_goodness", "infer_softmax"]),
    ("text-nextchar", Family.NEXT_CHARACTER, ["train_step", "train_positive", "train_negative", "infer_softmax"]),
])
def test_shipped_models(name, family, programs):
    model = load_model(MODELS / f"{name}.toml")
    assert model.family is family
    assert model.family.predicts_characters == (family is Family.NEXT_CHARACTER)
    assert bundle_programs(model) == programs


def test_a_recurrent_net_reads_out_by_goodness_without_goodness_layers():
    model = load_model(MODELS / "mnist-recurrent.toml")
    model = dataclasses.replace(model, readout=dataclasses.replace(model.readout, goodness_layers=()))
    assert readouts_of(model) == ["goodness"]
