"""Your own image classification data (``input.dataset = "images"``), in one of three forms that
``--data-dir`` names:

- a ``.npz`` file with arrays ``x_train``, ``y_train``, ``x_test``, ``y_test``: images uint8
  (0..255) or float in [0, 1], shaped [N, H, W], [N, H, W, C] or [N, features]; labels integers;
- a folder of IDX files (the MNIST format: Fashion-MNIST, KMNIST, EMNIST, any IDX export) whose
  names contain ``train-images``, ``train-labels`` and ``t10k-`` or ``test-images`` / ``-labels``;
  checked against a ``SHA256SUMS`` file beside them when there is one;
- a folder with ``train/`` and ``test/`` folders holding one folder of images per class (PNG, JPEG,
  ...; read with Pillow); classes are numbered in the sorted order of their folder names.

Rows come out as float32 in [0, 1] with colour planes one after another (as ``input.channels``
says), labels int64. Validation is the last sixth of the training part, as for MNIST; an image
folder's training images are shuffled once (seed 0) first, so that validation holds every class.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .idx import DataError, read_idx
from .mnist import SUMS_FILE, _read_sums, split_bounds

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
HELP = ("input.dataset = \"images\" reads --data-dir: a .npz file (x_train, y_train, x_test, y_test), a folder of "
        "IDX files, or a folder with train/ and test/ folders of images per class")


@dataclass
class ImageSource:
    path: Path
    form: str  # "npz", "idx" or "folder"
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    image_shape: tuple[int, int] | None  # None: rows given flat
    channels: int
    checked: str  # how the files were checked

    def describe(self) -> str:
        shape = f"{self.image_shape[0]}x{self.image_shape[1]}x{self.channels}" if self.image_shape else "flat rows"
        return (f"{self.form} data in {self.path} ({len(self.y_train)} train / {len(self.y_test)} test, {shape}, "
                f"{self.checked})")

    def split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        if split == "test":
            return self.x_test, self.y_test
        rows = split_bounds(len(self.y_train), split)
        return self.x_train[rows], self.y_train[rows]


def open_images(data_dir) -> ImageSource:
    if data_dir is None:
        raise DataError(f"{HELP}; give --data-dir")
    path = Path(data_dir).expanduser()
    if path.is_file() and path.suffix == ".npz":
        return _npz(path)
    if path.is_dir() and (path / "train").is_dir():
        return _folder(path)
    if path.is_dir():
        return _idx(path)
    raise DataError(f"{path} does not exist or is neither a .npz file nor a folder; {HELP}")


def _rows(images: np.ndarray, where: str) -> tuple[np.ndarray, tuple[int, int] | None, int]:
    """[N, ...] images -> (float32 [N, features] in [0, 1], image shape, channels)."""
    if images.dtype == np.uint8:
        pixels = images.astype(np.float32) / 255.0
    elif images.dtype.kind == "f":
        pixels = images.astype(np.float32)
        if pixels.size and not (np.isfinite(pixels).all() and pixels.min() >= 0.0 and pixels.max() <= 1.0):
            raise DataError(f"{where}: float images must lie in [0, 1] (got {pixels.min():.4g} .. {pixels.max():.4g}); "
                            "store uint8 0..255 or scale them")
    else:
        raise DataError(f"{where}: images must be uint8 or float, got {images.dtype}")
    if pixels.ndim == 2:
        return pixels, None, 1
    if pixels.ndim == 3:
        return pixels.reshape(len(pixels), -1), pixels.shape[1:3], 1
    if pixels.ndim == 4:  # [N, H, W, C] -> planes one after another
        return np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)).reshape(len(pixels), -1), pixels.shape[1:3], pixels.shape[3]
    raise DataError(f"{where}: images must be [N, H, W], [N, H, W, C] or [N, features], got shape {pixels.shape}")


def _labels(labels: np.ndarray, count: int, where: str) -> np.ndarray:
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != count:
        raise DataError(f"{where}: labels must be {count} integers (one per image), got {labels.dtype} {labels.shape}")
    if labels.size and labels.min() < 0:
        raise DataError(f"{where}: negative label {int(labels.min())}")
    return labels.astype(np.int64)


def _source(path, form, train, test, checked) -> ImageSource:
    (x_train, shape, channels), (x_test, test_shape, test_channels) = train[0], test[0]
    if (shape, channels, x_train.shape[1]) != (test_shape, test_channels, x_test.shape[1]):
        raise DataError(f"{path}: training and test images differ in shape")
    return ImageSource(path, form, x_train, train[1], x_test, test[1], shape, channels, checked)


def _npz(path: Path) -> ImageSource:
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test") if k in f.files}
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable .npz file ({e})") from None
    missing = {"x_train", "y_train", "x_test", "y_test"} - set(arrays)
    if missing:
        raise DataError(f"{path}: missing arrays {', '.join(sorted(missing))} (needs x_train, y_train, x_test, y_test)")
    parts = []
    for part in ("train", "test"):
        rows = _rows(arrays[f"x_{part}"], f"{path}: x_{part}")
        parts.append((rows, _labels(arrays[f"y_{part}"], len(rows[0]), f"{path}: y_{part}")))
    return _source(path, "npz", parts[0], parts[1], "no checksums")


def _idx(path: Path) -> ImageSource:
    files = sorted(p for p in path.iterdir() if p.is_file() and "idx" in p.name)

    def find(kind: str, part: str) -> Path:
        names = (f"train-{kind}",) if part == "train" else (f"t10k-{kind}", f"test-{kind}")
        found = [p for p in files if any(n in p.name for n in names)]
        if len(found) != 1:
            raise DataError(f"{path}: expected one IDX file whose name contains {' or '.join(names)}, found "
                            f"{len(found)}; {HELP}")
        return found[0]

    chosen = {(kind, part): find(kind, part) for part in ("train", "test") for kind in ("images", "labels")}
    checked = "no SHA256SUMS: unchecked"
    if (path / SUMS_FILE).is_file():
        sums = _read_sums(path / SUMS_FILE)
        for file in chosen.values():
            if file.name not in sums:
                raise DataError(f"{path / SUMS_FILE} does not list {file.name}")
            actual = hashlib.sha256(file.read_bytes()).hexdigest()
            if actual != sums[file.name]:
                raise DataError(f"checksum mismatch for {file}: expected sha256 {sums[file.name]} (from "
                                f"{path / SUMS_FILE}), got {actual}")
        checked = f"checked against {SUMS_FILE}"
    parts = []
    for part in ("train", "test"):
        rows = _rows(read_idx(chosen["images", part]), str(chosen["images", part]))
        parts.append((rows, _labels(read_idx(chosen["labels", part]), len(rows[0]), str(chosen["labels", part]))))
    return _source(path, "idx", parts[0], parts[1], checked)


def _folder(path: Path) -> ImageSource:
    try:
        from PIL import Image
    except ImportError:
        raise DataError("reading a folder of images needs Pillow: pip install pillow") from None
    classes = sorted(p.name for p in (path / "train").iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{path / 'train'}: no class folders (train/<class>/<image>)")
    parts = []
    for part in ("train", "test"):
        images, labels = [], []
        for label, name in enumerate(classes):
            folder = path / part / name
            for file in sorted(folder.iterdir()) if folder.is_dir() else ():
                if file.suffix.lower() in IMAGE_SUFFIXES:
                    try:
                        with Image.open(file) as image:
                            images.append(np.asarray(image.convert("L" if image.mode in ("1", "L", "I;16") else "RGB")))
                    except OSError as e:
                        raise DataError(f"{file}: not a readable image ({e})") from None
                    labels.append(label)
        if not images:
            raise DataError(f"{path / part}: no images in class folders {', '.join(classes)}")
        if len({im.shape for im in images}) != 1:
            raise DataError(f"{path / part}: images differ in size or colour ({sorted({im.shape for im in images})[:3]} ...)")
        stacked, y = np.stack(images), np.asarray(labels, np.int64)
        if part == "train":
            order = np.random.default_rng(0).permutation(len(y))
            stacked, y = stacked[order], y[order]
        parts.append((_rows(stacked, str(path / part)), y))
    return _source(path, "folder", parts[0], parts[1], f"classes {', '.join(classes[:5])}{' ...' if len(classes) > 5 else ''}")


def check_fits(model, x: np.ndarray, y: np.ndarray, source) -> None:
    """The data's row size and labels against the spec (``input.size``, ``input.image_shape`` and
    ``input.channels``, ``input.label.classes``), in one line naming the field."""
    inp = model.input
    if x.shape[1] != inp.size:
        shape = f" ({source.image_shape[0]}x{source.image_shape[1]} x {source.channels} channels)" if getattr(
            source, "image_shape", None) else ""
        raise DataError(f"{source.describe()}: {x.shape[1]} values per image{shape}, but the model's input.size is "
                        f"{inp.size}")
    shape = getattr(source, "image_shape", None)
    if shape is not None and (tuple(shape), source.channels) != (tuple(inp.image_shape), inp.channels):
        raise DataError(f"{source.describe()}: images are {shape[0]}x{shape[1]} with {source.channels} channel(s), the "
                        f"model's input.image_shape is {list(inp.image_shape)} with input.channels = {inp.channels}")
    if y.size and int(y.max()) >= inp.label.classes:
        raise DataError(f"{source.describe()}: label {int(y.max())} needs at least {int(y.max()) + 1} classes, the "
                        f"model's input.label.classes is {inp.label.classes}")
