"""The next-character data of sec. 4.1: alphabet, cleaning, strings and 10-character contexts."""

import numpy as np
import pytest

from ffcompile.data.idx import DataError
from ffcompile.data.text import ALPHABET, ENV_VAR, clean, contexts, decode, encode, load_corpus, one_hot, split_predictions, split_strings_of


def test_alphabet_is_the_papers_30_symbols():
    assert len(ALPHABET) == 30 == len(set(ALPHABET))
    assert ALPHABET[:26] == "abcdefghijklmnopqrstuvwxyz" and set(ALPHABET[26:]) == set(" ,;.")
    assert encode("az ,;.").tolist() == [0, 25, 26, 27, 28, 29]
    assert decode(encode("the fox; the crow.")) == "the fox; the crow."


def test_clean_lowercases_and_deletes_other_characters():
    assert clean("The Fox & the GRAPES!\n\"Sour,\" said he;\tthen left.") == "the fox the grapes sour, said he; then left."
    assert clean("but\u2014_whack_\u2014his well-known") == "but whack his well known"  # dashes separate words
    assert clean("don't 42") == "dont "
    with pytest.raises(DataError, match="alphabet"):
        encode("A")


def test_strings_and_contexts_give_22320_predictions():
    text = "A Wolf, meeting with a Lamb astray from the fold; resolved not to lay violent hands. " * 400
    strings = split_strings_of(text, "train")
    assert strings.shape == (248, 100)
    assert decode(strings[0][:12]) == "a wolf, meet"
    x, y = contexts(strings)
    assert x.shape == (22320, 10) and y.shape == (22320,)
    assert decode(x[0]) == "a wolf, me" and decode([y[0]]) == "e"
    assert decode(x[90]) == decode(strings[1][:10])  # each string starts a fresh context
    assert np.array_equal(one_hot(x[:2]).reshape(2, 10, 30).argmax(2), x[:2])


def test_short_or_missing_corpus(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="too short"):
        split_strings_of("a short fable.", "train")
    (tmp_path / "fables.txt").write_text("The Ant and the Grasshopper.")
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "fables.txt"))
    origin, text = load_corpus()
    assert text == "The Ant and the Grasshopper." and ENV_VAR in origin
    with pytest.raises(DataError, match="the train split needs strings 0..247"):
        split_predictions(text, "train", origin)
    with pytest.raises(DataError, match="is a folder"):
        load_corpus(tmp_path)
    with pytest.raises(DataError, match="cannot read text corpus"):
        load_corpus(tmp_path / "missing.txt")


def test_builtin_corpus_is_aesop_with_every_split(monkeypatch):
    """Built in: Jacobs' Aesop (sha256-checked); train = the paper's 248 strings = 22,320
    predictions; val and test 31 strings each, none overlapping."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    origin, text = load_corpus()
    assert "Aesop" in origin and text.startswith("The Cock and the Pearl")
    strings = {split: split_strings_of(text, split) for split in ("train", "val", "test", "trainval")}
    assert [len(strings[s]) for s in ("train", "val", "test", "trainval")] == [248, 31, 31, 279]
    assert np.array_equal(strings["trainval"], np.concatenate([strings["train"], strings["val"]]))
    x, y = split_predictions(text, "train")
    assert x.shape == (22320, 300) and y.shape == (22320,)
    assert np.all(x.sum(1) == 10)  # ten one-of-30 codes per context
    assert decode(x[0].reshape(10, 30).argmax(1)) == "the cock a" and decode(y[:3]) == "nd "


def test_tampered_builtin_corpus_is_caught(tmp_path, monkeypatch):
    from ffcompile.data import text

    monkeypatch.delenv(ENV_VAR, raising=False)
    (tmp_path / "SHA256SUMS").write_text((text.BUILTIN.parent / "SHA256SUMS").read_text())
    (tmp_path / "aesop.txt").write_text(text.BUILTIN.read_text().replace("Pearl", "Pear1", 1))
    monkeypatch.setattr(text, "BUILTIN", tmp_path / "aesop.txt")
    with pytest.raises(DataError, match="SHA256 mismatch"):
        load_corpus()
