"""One entry point for every data set a model can name (``input.dataset``): the CLI, bundle
builds and benchmarks call ``load_split`` and get float32 rows and int64 labels.

Splits: ``train`` (the training part), ``val`` (held out from the training file, never tested
on), ``trainval`` (both) and ``test`` (the official test set). MNIST: 50k / 10k / 60k / 10k (the
paper's split); CIFAR-10: the first 90 % of the training records / the last 10 % (45k / 5k of
the official 50k) / 50k / 10k; text: 248 strings (the paper's 22,320
predictions) / the next 31 strings / both / the 31 after those.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ffcompile.data.idx import DataError
from ffcompile.data.images import ImageSource, check_fits, open_images
from ffcompile.data.mnist import DataSource

SPLITS = ("train", "val", "trainval", "test")


@dataclass
class CifarSource:
    path: object  # the cifar-10-batches-bin folder
    _data: object = field(default=None, repr=False)

    def describe(self) -> str:
        return f"CIFAR-10 binary files in {self.path}"

    def arrays(self):
        if self._data is None:
            from ffcompile.data.cifar import load_cifar10

            self._data = load_cifar10(self.path)
        return self._data


@dataclass
class TextSource:
    origin: str  # where the corpus came from, for messages
    text: str

    def describe(self) -> str:
        return f"text corpus {self.origin}"


def resolve_source(dataset: str, data_dir):
    """The data source for ``dataset`` from ``data_dir`` (or its environment variable / built-in
    default). A source returned before is passed through, so callers can reuse it per split."""
    if isinstance(data_dir, (CifarSource, TextSource, DataSource, ImageSource)):
        return data_dir
    if dataset == "mnist":
        from ffcompile.data.mnist import resolve_data_dir

        return resolve_data_dir(data_dir)
    if dataset == "cifar10":
        from ffcompile.data.cifar import resolve_cifar_dir

        return CifarSource(resolve_cifar_dir(data_dir))
    if dataset == "text":
        from ffcompile.data.text import load_corpus

        origin, text = load_corpus(data_dir)
        return TextSource(origin, text)
    if dataset == "images":
        return open_images(data_dir)
    raise DataError(f"unknown dataset {dataset!r} (known: mnist, cifar10, text, images)")


def load_split(dataset: str, data_dir, split: str):
    """(source, x float32 [n, features], y int64 [n]) of one split."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} (known: {', '.join(SPLITS)})")
    source = resolve_source(dataset, data_dir)
    if dataset == "mnist":
        from ffcompile.data.mnist import load_mnist

        x, y = load_mnist(source, split)
    elif dataset == "images":
        x, y = source.split(split)
    elif dataset == "cifar10":
        data = source.arrays()
        cut = len(data.x_train) - len(data.x_train) // 10
        parts = {"train": slice(0, cut), "val": slice(cut, None), "trainval": slice(0, None)}
        if split == "test":
            x, y = data.x_test, data.y_test
        else:
            x, y = data.x_train[parts[split]], data.y_train[parts[split]]
            if len(x) == 0:
                raise DataError(f"{source.describe()}: no {split} examples ({len(data.x_train)} training records)")
    else:
        from ffcompile.data.text import split_predictions

        x, y = split_predictions(source.text, split, source.origin)
    return source, np.ascontiguousarray(x, dtype=np.float32), np.asarray(y, dtype=np.int64)


def load_model_split(model, data_dir, split: str):
    """``load_split`` of the model's ``input.dataset``, checked against the spec's input size,
    image shape and label count."""
    source, x, y = load_split(model.input.dataset, data_dir, split)
    check_fits(model, x, y, source)
    return source, x, y


def data_dir_help() -> str:
    return ("Data for the model's input.dataset. mnist: folder with the IDX files (default "
            "$FFCOMPILE_DATA_DIR, else the built-in subset); cifar10: folder with cifar-10-batches-bin "
            "(default $FFCOMPILE_CIFAR_DIR); text: a plain-text corpus file (default "
            "$FFCOMPILE_TEXT_CORPUS, else the built-in corpus); images: your own data, a .npz file, a folder "
            "of IDX files or a folder of train/ and test/ image folders per class (docs/data.md).")

