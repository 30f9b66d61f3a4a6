"""The bundle format, shared by the compiler (which writes it) and the runtime (which checks it).

A bundle is a directory::

    manifest.json            format, model IR, target, programs and their signatures, versions,
                             and the sha256 of every other file
    programs/<name>.<ext>    one compiled program per FF program (.onnx for onnxruntime)
    weights.safetensors      parameters
    optimizer.safetensors    optimizer state; training epoch/step in its metadata
    parity.json              the verification report made at build time
    bundle.digest            the bundle digest (sha256 over the manifest, see ``integrity``)
    bundle.sig               optional: an ed25519 signature of the digest

Nothing else may be in it: loading refuses unknown, missing and modified files, names that are not
plain relative paths inside the bundle (``confine``), links, FIFOs and devices.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..core.errors import FFCompileError
from .confine import open_plain, plain_files, read_plain
from .integrity import MANIFEST, UNLISTED, check_integrity
from .manifest_structure import check_structure

FORMAT = "ffcompile-bundle"
FORMAT_VERSION = 2  # 2: bundle.digest beside the manifest (version 1 bundles had none)
MAX_MANIFEST_BYTES = 8 << 20
WEIGHTS = "weights.safetensors"
OPTIMIZER = "optimizer.safetensors"
PARITY = "parity.json"
PROGRAMS_DIR = "programs"
# doc_string of an ONNX initializer that an exported program folded from a slice of a weight
# (compiler/export.py); what int8 quantization leaves float32 and its reference reads unrounded
WEIGHT_SLICE = "ffcompile: a slice of "
WEIGHTS_FORMAT = "ffcompile-weights-1"


class BundleError(FFCompileError):
    pass


def sha256_file(path: Path) -> str:
    """sha256 of a regular file (never follows a final symbolic link, never blocks on a FIFO)."""
    digest = hashlib.sha256()
    fd = open_plain(Path(path))
    with os.fdopen(fd, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def bundle_files(root: Path) -> list[str]:
    """Every file under ``root`` except the manifest and its digest and signature, as sorted
    relative POSIX paths; refuses links, FIFOs and devices (``confine.plain_files``)."""
    return [rel for rel in plain_files(root) if rel != MANIFEST and rel not in UNLISTED]


def checksums(root: Path) -> dict[str, str]:
    return {rel: sha256_file(root / rel) for rel in bundle_files(root)}


def is_bundle_dir(path: Path) -> bool:
    """Whether ``path`` looks like a bundle (its manifest says so), without verifying it."""
    try:
        return json.loads(read_plain(Path(path) / MANIFEST, MAX_MANIFEST_BYTES)).get("format") == FORMAT
    except (OSError, ValueError, AttributeError, RecursionError, FFCompileError):
        return False


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def read_manifest(root: Path, trust=None, digest: str | None = None) -> dict:
    """The manifest after checking its bytes against the bundle digest (and, with ``trust``, the
    signature; with ``digest``, a pinned digest) and its structure; see ``integrity``."""
    root = Path(root)
    if not root.is_dir() or root.is_symlink():
        raise BundleError(f"{root}: not a bundle directory (it does not exist, is a file or a symbolic link)")
    path = root / MANIFEST
    try:
        data = read_plain(path, MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        raise BundleError(f"{root}: not a bundle ({MANIFEST} missing)") from None
    check_integrity(root, data, trust, digest)
    try:
        manifest = json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise BundleError(f"{path}: not valid JSON ({str(e)[:200]})") from None
    except RecursionError:
        raise BundleError(f"{path}: JSON nested too deeply") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise BundleError(f"{path}: not an ffcompile bundle manifest (format {str(got)[:80]!r}, expected {FORMAT!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"{path}: bundle format version {version if isinstance(version, int) else repr(str(version)[:20])} is not supported by this ffcompile "
                          f"(it reads version {FORMAT_VERSION}); rebuild the bundle with this ffcompile")
    check_structure(manifest, str(path))
    return manifest


def verify_files(root: Path, manifest: dict) -> None:
    """Every file listed is present with its checksum, and no other file is there."""
    root = Path(root)
    listed = manifest["files"]
    present = set(bundle_files(root))
    unknown = sorted(present - set(listed))
    if unknown:
        raise BundleError(f"bundle {root}: unexpected file(s) not in the manifest: {', '.join(unknown)}; "
                          "refusing to load a bundle that was changed after it was built")
    missing = sorted(set(listed) - present)
    if missing:
        raise BundleError(f"bundle {root}: missing file(s) listed in the manifest: {', '.join(missing)}")
    for rel, digest in sorted(listed.items()):
        actual = sha256_file(root / rel)
        if actual != digest:
            raise BundleError(f"bundle {root}: {rel} does not match its sha256 in the manifest (expected {digest[:16]}…, "
                              f"got {actual[:16]}…); the file was modified or truncated after the build")
