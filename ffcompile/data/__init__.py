"""MNIST data: IDX files, the built-in subset, download, splits and jitter augmentation."""

from ffcompile.data.augment import jitter, random_shifts, shift_images
from ffcompile.data.idx import DataError, read_idx, write_idx
from ffcompile.data.mnist import DataSource, download_mnist, load_mnist, resolve_data_dir

__all__ = [
    "DataError",
    "DataSource",
    "download_mnist",
    "jitter",
    "load_mnist",
    "random_shifts",
    "read_idx",
    "resolve_data_dir",
    "shift_images",
    "write_idx",
]
