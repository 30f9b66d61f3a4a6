"""CIFAR-10 (sec. 4) from the official *binary* distribution, ``cifar-10-batches-bin``.

Each file is a run of 3073-byte records: one label byte (0-9), then 3072 pixel bytes, the 32x32
red plane, then green, then blue, each row-major. Only this format is read: the python version
of the data set is pickled, and unpickling runs arbitrary code.

The directory comes from ``data_dir`` or ``$FFCOMPILE_CIFAR_DIR``; it may be
``cifar-10-batches-bin`` itself or the folder the tarball was unpacked in. ``download_cifar10``
fetches the official archive and checks the MD5 its authors publish (``ARCHIVE_MD5``) and its
size before extracting the six batch files, nothing else. No per-file sums are pinned, so every
file is checked for its record structure: whole records, labels below 10.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ffcompile.data.idx import DataError

ENV_VAR = "FFCOMPILE_CIFAR_DIR"
SUBDIR = "cifar-10-batches-bin"
TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_FILE = "test_batch.bin"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_SHAPE = (3, 32, 32)
PIXELS = 3 * 32 * 32
RECORD = 1 + PIXELS
ARCHIVE_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
ARCHIVE_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"  # the "binary version" row of www.cs.toronto.edu/~kriz/cifar.html
ARCHIVE_BYTES = 170_052_171


@dataclass(frozen=True)
class Cifar10:
    """Pixels scaled to [0, 1] as float32 rows of 3072 (channel planes, as stored); labels int64."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    path: Path


def resolve_cifar_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding the ``.bin`` files: ``data_dir``, else $FFCOMPILE_CIFAR_DIR, or their
    ``cifar-10-batches-bin`` subfolder. Raises DataError naming every file looked for."""
    origin = "the data_dir argument"
    if data_dir is None:
        if not os.environ.get(ENV_VAR):
            raise DataError(f"no CIFAR-10 directory: pass --data-dir or set ${ENV_VAR} to the folder holding "
                            f"{SUBDIR}/ ({', '.join(TRAIN_FILES + (TEST_FILE,))})")
        data_dir, origin = os.environ[ENV_VAR], f"${ENV_VAR}"
    root = Path(data_dir).expanduser()
    for candidate in (root, root / SUBDIR):
        if all((candidate / name).is_file() for name in TRAIN_FILES + (TEST_FILE,)):
            return candidate
    looked = root / SUBDIR if (root / SUBDIR).is_dir() else root
    missing = [name for name in TRAIN_FILES + (TEST_FILE,) if not (looked / name).is_file()]
    raise DataError(f"CIFAR-10 binary files missing in {looked} (from {origin}): {', '.join(missing)} "
                    f"(looked for {', '.join(TRAIN_FILES + (TEST_FILE,))} in {root} and {root / SUBDIR})")


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One binary batch file -> (pixels uint8 [n, 3072], labels uint8 [n])."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from None
    whole, rest = divmod(data.size, RECORD)
    if rest:
        raise DataError(f"{path}: record {whole} is truncated ({rest} of {RECORD} bytes: 1 label + {PIXELS} pixels)")
    if whole == 0:
        raise DataError(f"{path}: holds no records")
    records = data.reshape(whole, RECORD)
    labels = records[:, 0]
    bad = np.flatnonzero(labels >= len(CLASSES))
    if bad.size:
        raise DataError(f"{path}: record {bad[0]} has label byte {labels[bad[0]]}, expected 0-9 "
                        "(not a CIFAR-10 binary file?)")
    return records[:, 1:], labels


def load_cifar10(data_dir: str | os.PathLike | None = None) -> Cifar10:
    path = resolve_cifar_dir(data_dir)
    train = [read_batch(path / name) for name in TRAIN_FILES]
    x_test, y_test = read_batch(path / TEST_FILE)
    scale = lambda pixels: pixels.astype(np.float32) / 255.0
    return Cifar10(x_train=scale(np.concatenate([x for x, _ in train])),
                   y_train=np.concatenate([y for _, y in train]).astype(np.int64),
                   x_test=scale(x_test), y_test=y_test.astype(np.int64), path=path)


def to_images(rows: np.ndarray) -> np.ndarray:
    """[n, 3072] rows -> [n, 32, 32, 3] (height, width, RGB) for pictures."""
    return rows.reshape(-1, *IMAGE_SHAPE).transpose(0, 2, 3, 1)


def download_cifar10(dest_dir: str | os.PathLike, url: str = ARCHIVE_URL, md5: str = ARCHIVE_MD5,
                     size: int | None = ARCHIVE_BYTES, timeout: float = 60.0, log=print) -> Path:
    """Fetch the binary archive into ``dest_dir``, verify its MD5 (and size), extract only the six
    batch files into ``dest_dir/cifar-10-batches-bin`` and check their records. Files already
    there and readable are kept. Returns the batch folder."""
    dest = Path(dest_dir).expanduser()
    try:
        present = resolve_cifar_dir(dest)
        for name in TRAIN_FILES + (TEST_FILE,):
            read_batch(present / name)
        log(f"CIFAR-10 binary files already present in {present}")
        return present
    except DataError:
        pass
    folder = dest / SUBDIR
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".cifar-download-") as tmp:
        archive = Path(tmp) / "cifar-10-binary.tar.gz"
        digest, got = hashlib.md5(), 0
        log(f"downloading {url}")
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, archive.open("wb") as out:
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    got += len(chunk)
                    out.write(chunk)
        except OSError as err:
            raise DataError(f"could not download {url}: {err}") from None
        if digest.hexdigest() != md5 or (size is not None and got != size):
            raise DataError(f"{url}: wrong archive (md5 {digest.hexdigest()}, {got} bytes; expected md5 {md5}"
                            + (f", {size} bytes)" if size is not None else ")"))
        with tarfile.open(archive, "r:gz") as tar:
            for name in TRAIN_FILES + (TEST_FILE,):
                try:
                    member = tar.getmember(f"{SUBDIR}/{name}")
                except KeyError:
                    raise DataError(f"{url}: the archive has no {SUBDIR}/{name}") from None
                if not member.isfile():
                    raise DataError(f"{url}: {SUBDIR}/{name} is not a regular file")
                part = folder / f".{name}.part"
                part.write_bytes(tar.extractfile(member).read())
                read_batch(part)
                os.replace(part, folder / name)
    log(f"CIFAR-10 binary files verified in {folder}")
    return folder
