"""Next-character data (sec. 4.1): a 30-symbol alphabet, 248 strings of 100 characters, each
predicted from the previous 10 characters after a 10-character start.

The paper's corpus is Aesop's fables. No copy is available offline here, so the corpus is any
plain-text file given as ``path`` or ``$FFCOMPILE_TEXT_CORPUS`` (e.g. a Project Gutenberg
Aesop); tests use text written for them.
"""

from __future__ import annotations

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
_INDEX = {c: i for i, c in enumerate(ALPHABET)}


def clean(text: str) -> str:
    """Lower-case and delete every character outside the alphabet. Line breaks and other white
    space become one space first: in a text file they separate words, they are not characters
    of the text (deleting them would glue words together)."""
    text = re.sub(r"\s+", " ", text.lower())
    return "".join(c for c in text if c in _INDEX)


def encode(text: str) -> np.ndarray:
    """Alphabet indices of an already cleaned string."""
    try:
        return np.array([_INDEX[c] for c in text], dtype=np.int64)
    except KeyError as err:
        raise DataError(f"character {err.args[0]!r} is not in the 30-symbol alphabet (clean() the text first)") from None


def decode(indices) -> str:
    return "".join(ALPHABET[int(i)] for i in indices)


def split_strings(text: str, count: int = STRINGS, length: int = LENGTH) -> np.ndarray:
    """The first ``count`` consecutive ``length``-character pieces of the cleaned text, encoded
    [count, length]."""
    cleaned = clean(text)
    if len(cleaned) < count * length:
        raise DataError(f"corpus too short: {len(cleaned)} characters after cleaning, "
                        f"{count} strings of {length} need {count * length}")
    return encode(cleaned[:count * length]).reshape(count, length)


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


def load_corpus(path: str | os.PathLike | None = None) -> str:
    if path is None:
        if not os.environ.get(ENV_VAR):
            raise DataError(f"no text corpus: pass a plain-text file or set ${ENV_VAR} "
                            "(the paper used Aesop's fables)")
        path = os.environ[ENV_VAR]
    try:
        return Path(path).expanduser().read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        raise DataError(f"cannot read text corpus {path}: {err.strerror or err}") from None
