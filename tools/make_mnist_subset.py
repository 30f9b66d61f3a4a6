"""Build the MNIST subset committed under ffcompile/data/builtin/.

Source: the official MNIST files (train-images-idx3-ubyte.gz, ... as published by
LeCun, Cortes and Burges, mirrored e.g. at https://ossci-datasets.s3.amazonaws.com/mnist/),
checked against their official SHA256 sums before use. The subset is the first
5000 images/labels of the training file and the first 1000 of the t10k test
file, in their original order, stored as gzip IDX files under the official
names plus a SHA256SUMS. Output is byte-for-byte reproducible (gzip mtime 0)
for a given zlib.

    python tools/make_mnist_subset.py SOURCE_DIR [--out ffcompile/data/builtin]
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from ffcompile.data.idx import write_idx  # noqa: E402
from ffcompile.data.mnist import FILES, SUMS_FILE, resolve_data_dir  # noqa: E402

N_TRAIN, N_TEST = 5000, 1000


def make_subset(source_dir: Path, out_dir: Path) -> list[Path]:
    source = resolve_data_dir(source_dir)
    if source.builtin or source.sizes != (60000, 10000):
        sys.exit(f"{source_dir}: expected the full official MNIST, found {source.describe()}")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for role, base in FILES.items():
        count = N_TEST if role.startswith("test") else N_TRAIN
        path = out_dir / (base + ".gz")
        write_idx(path, source.read(role)[:count], gzip=True)  # read() checks the official sha256
        written.append(path)
    sums = "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n" for p in sorted(written))
    (out_dir / SUMS_FILE).write_text(sums, encoding="utf-8")
    return written + [out_dir / SUMS_FILE]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source_dir", type=Path, help="directory holding the official MNIST files")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "ffcompile" / "data" / "builtin")
    args = parser.parse_args()
    for path in make_subset(args.source_dir, args.out):
        print(f"{path.stat().st_size:>9}  {path}")


if __name__ == "__main__":
    main()
