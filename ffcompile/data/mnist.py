"""Find, verify, load and download MNIST.

Data comes from, in order: an explicit directory argument, the FFCOMPILE_DATA_DIR
environment variable, or the small subset committed under ffcompile/data/builtin/.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import sys
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

from ffcompile.data.idx import GZIP_MAGIC, DataError, one_line, parse_idx

ENV_VAR = "FFCOMPILE_DATA_DIR"
BUILTIN = "builtin"
BUILTIN_DIR = Path(__file__).parent / "builtin"
SUMS_FILE = "SHA256SUMS"

# role -> official base name; each file may be stored gzipped (name + ".gz") or raw.
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# The .gz sums are the published ones; the raw sums are of the same files gunzipped.
OFFICIAL_SHA256 = {
    "train-images-idx3-ubyte.gz": "b09d8b89df4ad239afc76a323dbe9559169cd8cca365467dfe8aa1f7ca54109b",
    "train-labels-idx1-ubyte.gz": "c51906e7929bbf7c824fbd16019b56297269ca82cba449c5b5d59c0a02147fed",
    "t10k-images-idx3-ubyte.gz": "f72c2dff3457595ec2fe452d25d97b7f974a74ad5b006687704212bedd1486d8",
    "t10k-labels-idx1-ubyte.gz": "4baf84ddd60ae342cfdd282ec3fba3249a201a4459782165496a7cbebbe49a2e",
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)

SPLITS = ("train", "val", "trainval", "test")


@dataclass(frozen=True)
class DataSource:
    """Where MNIST is read from, and the checksums its files must match."""

    path: Path
    builtin: bool
    files: dict[str, Path]  # role -> file
    sums: dict[str, str] = field(default_factory=dict)  # file name -> sha256 from the directory's SHA256SUMS
    sizes: tuple[int, int] = (0, 0)  # images in the training file, in the test file

    def describe(self) -> str:
        counts = f"({self.sizes[0]} train / {self.sizes[1]} test)"
        if self.builtin:
            return f"built-in MNIST subset {counts}"
        return f"MNIST in {self.path} {counts}"

    def read(self, role: str) -> np.ndarray:
        """Read one file as an array after checking its sha256."""
        path = self.files[role]
        data = _read_bytes(path)
        self._check_sha256(path, data)
        return parse_idx(data, path)

    def verify(self) -> None:
        """Check every file listed in SHA256SUMS and the four data files in use."""
        names = set(self.sums) | {p.name for p in self.files.values()}
        for name in sorted(names):
            path = self.path / name
            self._check_sha256(path, _read_bytes(path))

    def _check_sha256(self, path: Path, data: bytes) -> None:
        actual = hashlib.sha256(data).hexdigest()
        expectations = []
        if path.name in self.sums:
            expectations.append((self.sums[path.name], self.path / SUMS_FILE))
        if not self.builtin and path.name in OFFICIAL_SHA256:
            expectations.append((OFFICIAL_SHA256[path.name], "the official MNIST sum"))
        for expected, origin in expectations:
            if actual != expected:
                hint = ("; for your own IDX data set (Fashion-MNIST, EMNIST, ...) use input.dataset = \"images\""
                        if origin == "the official MNIST sum" else "")
                raise DataError(
                    f"checksum mismatch for {path}: expected sha256 {expected} (from {origin}), got {actual}{hint}"
                )


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from None


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> DataSource:
    """Pick the data source: `data_dir`, else $FFCOMPILE_DATA_DIR, else the built-in subset."""
    origin = "the data_dir argument"
    if data_dir is None and os.environ.get(ENV_VAR):
        data_dir, origin = os.environ[ENV_VAR], f"${ENV_VAR}"
    if data_dir is None or str(data_dir) == BUILTIN:
        return _open_dir(BUILTIN_DIR, builtin=True, origin="built-in subset")
    return _open_dir(Path(data_dir).expanduser(), builtin=False, origin=origin)


def _open_dir(path: Path, builtin: bool, origin: str) -> DataSource:
    hint = f"run `ffcompile data download DIR` and pass DIR or set {ENV_VAR}=DIR"
    wanted = ", ".join(f"{name}.gz (or {name})" for name in FILES.values())
    if not path.is_dir():
        raise DataError(f"MNIST directory {path} (from {origin}) does not exist; looked for {wanted} there; {hint}")
    files, missing = {}, []
    for role, name in FILES.items():
        found = [path / n for n in (name + ".gz", name) if (path / n).is_file()]
        if found:
            files[role] = found[0]
        else:
            missing.append(f"{name}.gz (or {name})")
    if missing:
        raise DataError(f"MNIST files missing in {path} (from {origin}): {', '.join(missing)}; {hint}")
    sums = _read_sums(path / SUMS_FILE) if (path / SUMS_FILE).is_file() else {}
    for name in sums:
        if not (path / name).is_file():
            raise DataError(f"{path / SUMS_FILE} lists {name}, which is missing from {path}")
    sizes = (_count(files["train_labels"]), _count(files["test_labels"]))
    return DataSource(path=path, builtin=builtin, files=files, sums=sums, sizes=sizes)


def _read_sums(sums_path: Path) -> dict[str, str]:
    """Parse a `sha256sum` output file: '<64 hex>  <name>' (or ' *<name>' for binary mode)."""
    sums = {}
    for number, line in enumerate(sums_path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        digest, _, name = line.partition(" ")
        name = name[1:] if name[:1] in (" ", "*") else name
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest.lower()) or not name:
            raise DataError(f"{sums_path} line {number} is not '<sha256>  <file name>': {line.strip()!r}")
        sums[name] = digest.lower()
    return sums


def _count(labels_path: Path) -> int:
    """Number of items in an IDX file, read from its header alone (no checksum: just for describe())."""
    with open(labels_path, "rb") as f:
        head = f.read(8)
    if head.startswith(GZIP_MAGIC):
        try:
            with gzip.open(labels_path, "rb") as f:
                head = f.read(8)
        except (OSError, EOFError) as err:
            raise DataError(f"{labels_path}: corrupt gzip stream ({one_line(err)})") from None
    if len(head) < 8 or head[:2] != b"\x00\x00" or head[3] < 1:
        raise DataError(f"{labels_path}: not an IDX file (bad magic number {head[:4].hex() or 'empty'})")
    return int.from_bytes(head[4:8], "big")


def split_bounds(n: int, split: str) -> slice:
    """Rows of a training file of `n` images used by `split`.

    The last sixth (n // 6 rows, rounded down) is validation and the rest is
    training: 60000 -> 50000 + 10000 as in the paper, 5000 -> 4167 + 833.
    """
    n_val = n // 6
    return {"train": slice(0, n - n_val), "val": slice(n - n_val, n), "trainval": slice(0, n)}[split]


def load_mnist(
    data_dir: str | os.PathLike | DataSource | None = None, split: str = "train"
) -> tuple[np.ndarray, np.ndarray]:
    """Return (images float32 [N, 784] in [0, 1], labels int64 [N]) for one split.

    Splits: "train" (first 5/6 of the training file), "val" (its last 1/6),
    "trainval" (all of it) and "test" (the t10k file).
    """
    if split not in SPLITS:
        raise DataError(f"unknown MNIST split {split!r}; expected one of {', '.join(SPLITS)}")
    source = data_dir if isinstance(data_dir, DataSource) else resolve_data_dir(data_dir)
    prefix = "test" if split == "test" else "train"
    images, labels = source.read(f"{prefix}_images"), source.read(f"{prefix}_labels")
    images_path, labels_path = source.files[f"{prefix}_images"], source.files[f"{prefix}_labels"]
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(f"{images_path}: expected uint8 images of shape [N, 28, 28], got {images.dtype} {images.shape}")
    if labels.dtype != np.uint8 or labels.shape != images.shape[:1]:
        raise DataError(
            f"{labels_path}: expected {images.shape[0]} uint8 labels to match {images_path.name}, "
            f"got {labels.dtype} {labels.shape}"
        )
    if labels.size and labels.max() > 9:
        raise DataError(f"{labels_path}: label {int(labels.max())} is out of range 0-9")
    rows = slice(None) if split == "test" else split_bounds(len(labels), split)
    pixels = images[rows].reshape(-1, 28 * 28).astype(np.float32)
    pixels /= 255.0
    return pixels, labels[rows].astype(np.int64)


def download_mnist(
    dest_dir: str | os.PathLike,
    progress: bool = True,
    mirrors: Sequence[str] = MIRRORS,
    log: Callable[[str], None] | None = None,
    timeout: float = 60.0,
) -> DataSource:
    """Download the four official .gz files into `dest_dir`, trying `mirrors` in order.

    A file is renamed into place only once its sha256 matches the official sum;
    files already present with the right sum are kept. Failures are reported
    through `log` (default: stderr) before the next mirror is tried.
    """
    log = log or (lambda message: tqdm.write(message, file=sys.stderr))
    dest = Path(dest_dir).expanduser()
    dest.mkdir(parents=True, exist_ok=True)
    for base in FILES.values():
        name = base + ".gz"
        target = dest / name
        if target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == OFFICIAL_SHA256[name]:
            log(f"{target} already present and verified")
            continue
        errors = []
        for mirror in mirrors:
            url = mirror.rstrip("/") + "/" + name
            try:
                _fetch_verified(url, target, OFFICIAL_SHA256[name], progress, timeout)
                break
            except (OSError, ValueError, http.client.HTTPException, DataError) as err:
                errors.append(f"{url}: {one_line(err)}")
                log(f"download failed, trying next mirror: {errors[-1]}")
        else:
            raise DataError(
                f"could not download {name} from any mirror (tried {', '.join(mirrors)}); last error: "
                + (errors[-1] if errors else "no mirrors given")
            )
    return resolve_data_dir(dest)


def _fetch_verified(url: str, target: Path, sha256: str, progress: bool, timeout: float) -> None:
    """Stream `url` to a temp file beside `target`; rename it into place only if its sha256 matches."""
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=target.name, disable=not progress) as bar:
                while chunk := response.read(1 << 16):
                    digest.update(chunk)
                    out.write(chunk)
                    bar.update(len(chunk))
        if digest.hexdigest() != sha256:
            raise DataError(f"wrong sha256 for {target.name}: expected {sha256}, got {digest.hexdigest()}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
