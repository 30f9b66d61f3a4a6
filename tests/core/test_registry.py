"""The primitive registry: every entry is complete, the builder offers exactly its entries, and
shape rules refuse bad arguments."""

import pytest

from ffcompile.core.builder import Builder
from ffcompile.core.primitives import PRIMITIVES, primitive


def test_every_primitive_has_a_rule_a_meaning_and_a_lowering():
    for p in PRIMITIVES.values():
        if p.name == "constant":  # Builder.constant; an initializer in ONNX
            continue
        assert callable(p.rule) and callable(p.reference) and callable(p.onnx), p.name
        assert p.doc, p.name


def test_the_builder_offers_the_registry():
    b = Builder("t")
    x = b.input("x", (2, 3))
    assert b.tanh(x).shape == (2, 3)
    assert b.reduce_sum(x, [1], keepdims=True).shape == (2, 1)
    with pytest.raises(AttributeError, match="no primitive or method 'softmax'"):
        b.softmax(x)


def test_shape_rules_refuse_bad_arguments():
    b = Builder("t")
    x = b.input("x", (2, 3))
    with pytest.raises(ValueError, match="inner dimensions differ"):
        b.matmul(x, x)
    with pytest.raises(ValueError, match="unknown dtype"):
        b.cast(x, "float16")
    with pytest.raises(ValueError, match="out of range"):
        b.slice(x, 1, 2, 5)


def test_a_name_is_registered_once():
    with pytest.raises(ValueError, match="registered twice"):
        primitive("add", reference=None, onnx=None)(lambda b, x: None)
