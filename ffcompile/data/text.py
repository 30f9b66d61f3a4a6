"""Next-character data (sec. 4.1): a 30-symbol alphabet, 248 strings of 100 characters, each
predicted from the previous 10 characters after a 10-character start.

The paper's corpus is Aesop's fables. Built in: Joseph Jacobs' *The Fables of Aesop* (1894,
public domain; Project Gutenberg eBook #28, as shipped in the PyPI sdist puren-tonbo 0.0.3 at
``puren_tonbo/tests/data/pg28_the_fables_of_aesop_utf8.txt``, sha256 b247333c...2a48), cut to the
82 fables (title, story, moral; the Gutenberg header, preface, essay and licence removed),
sha256 in ``builtin/text/SHA256SUMS``. Any other plain-text file: ``path`` or $FFCOMPILE_TEXT_CORPUS.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np

from ffcompile.data.idx import DataError

ENV_VAR = "FFCOMPILE_TEXT_CORPUS"
ALPHABET = "abcdefghijklmnopqrstuvwxyz ,;."
STRINGS = 248
LENGTH = 100
CONTEXT = 10
PREDICTIONS = LENGTH - CONTEXT  # per string: the first CONTEXT characters are context only
_INDEX = {c: i for i, c in enumerate(ALPHABET)}


def clean(text: str) -> str:
    """Lower-case and delete every character outside the alphabet. Runs of white space and dashes
    become one space first: in a text file they separate words, they are not characters of the
    text (deleting them would glue "but\u2014whack\u2014his" into one word)."""
    text = re.sub(r"[\s\u2010-\u2015-]+", " ", text.lower())
    return re.sub(" +", " ", "".join(c for c in text if c in _INDEX))


def encode(text: str) -> np.ndarray:
    """Alphabet indices of an already cleaned string."""
    try:
        return np.array([_INDEX[c] for c in text], dtype=np.int64)
    except KeyError as err:
        raise DataError(f"character {err.args[0]!r} is not in the 30-symbol alphabet (clean() the text first)") from None


def decode(indices) -> str:
    return "".join(ALPHABET[int(i)] for i in indices)


def contexts(strings: np.ndarray, context: int = CONTEXT) -> tuple[np.ndarray, np.ndarray]:
    """Every prediction the strings hold: (previous ``context`` characters [n, context], next
    character [n]); the first ``context`` characters of each string are context only, so 248
    strings of 100 give 248 x 90 = 22,320 predictions (sec. 4.1)."""
    count, length = strings.shape
    windows = np.lib.stride_tricks.sliding_window_view(strings, context + 1, axis=1)
    windows = windows.reshape(count * (length - context), context + 1)
    return windows[:, :context].copy(), windows[:, context].copy()


def one_hot(indices: np.ndarray) -> np.ndarray:
    """[n, k] indices -> [n, k * 30] float32: one one-of-30 block per character."""
    flat = np.zeros((indices.size, len(ALPHABET)), np.float32)
    flat[np.arange(indices.size), indices.reshape(-1)] = 1.0
    return flat.reshape(indices.shape[0], -1)


SPLIT_STRINGS = {"train": (0, STRINGS), "val": (STRINGS, STRINGS + 31), "trainval": (0, STRINGS + 31),
                 "test": (STRINGS + 31, STRINGS + 62)}
BUILTIN = Path(__file__).parent / "builtin" / "text" / "aesop.txt"


def split_strings_of(text: str, split: str, origin: str = "corpus") -> np.ndarray:
    """The strings of one split [count, 100]: train = the first 248 (the paper's), val and test
    the 31 after that each (held out: never trained on)."""
    first, last = SPLIT_STRINGS[split]
    cleaned = clean(text)
    if len(cleaned) < last * LENGTH:
        raise DataError(f"{origin}: corpus too short: {len(cleaned)} characters after cleaning; the {split} split "
                        f"needs strings {first}..{last - 1} of {LENGTH} characters ({last * LENGTH} characters)")
    return encode(cleaned[first * LENGTH:last * LENGTH]).reshape(last - first, LENGTH)


def split_predictions(text: str, split: str, origin: str = "corpus") -> tuple[np.ndarray, np.ndarray]:
    """(one-hot contexts [n, 300], next characters [n]) of a split, string by string: rows
    s * 90 .. s * 90 + 89 are string s, its first row the string's first 10 characters."""
    ctx, nxt = contexts(split_strings_of(text, split, origin))
    return one_hot(ctx), nxt


def load_corpus(path: str | os.PathLike | None = None) -> tuple[str, str]:
    """(where it came from, the raw text): ``path``, else $FFCOMPILE_TEXT_CORPUS, else the
    built-in corpus."""
    origin = str(path)
    if path is None:
        if os.environ.get(ENV_VAR):
            path, origin = os.environ[ENV_VAR], f"${ENV_VAR} ({os.environ[ENV_VAR]})"
        else:
            return "built-in (Aesop's fables, Jacobs 1894)", _read_builtin()
    path = Path(path).expanduser()
    if path.is_dir():
        raise DataError(f"text corpus {origin}: is a folder; pass a plain-text file")
    try:
        return origin, path.read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        raise DataError(f"cannot read text corpus {origin}: {err.strerror or err}") from None


def _read_builtin() -> str:
    data = BUILTIN.read_bytes()
    sums = dict(line.split()[::-1] for line in (BUILTIN.parent / "SHA256SUMS").read_text().splitlines() if line.strip())
    if hashlib.sha256(data).hexdigest() != sums.get(BUILTIN.name):
        raise DataError(f"{BUILTIN}: SHA256 mismatch with {BUILTIN.parent / 'SHA256SUMS'} (damaged installation?)")
    return data.decode("utf-8")
