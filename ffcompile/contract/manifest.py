"""The bundle format, shared by the compiler (which writes it) and the runtime (which checks it).

A bundle is a directory::

    manifest.json            format, model IR, target, programs and their signatures, versions,
                             and the sha256 of every other file
    programs/<name>.<ext>    one compiled program per FF program (.onnx for onnxruntime)
    weights.safetensors      parameters
    optimizer.safetensors    optimizer state; training epoch/step in its metadata
    parity.json              the verification report made at build time

Nothing else may be in it: loading refuses unknown, missing and modified files.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..core.errors import FFCompileError

FORMAT = "ffcompile-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
OPTIMIZER = "optimizer.safetensors"
PARITY = "parity.json"
PROGRAMS_DIR = "programs"
WEIGHTS_FORMAT = "ffcompile-weights-1"
REQUIRED_KEYS = ("format", "format_version", "model", "target", "programs", "batch", "files")


class BundleError(FFCompileError):
    pass


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def bundle_files(root: Path) -> list[str]:
    """Every file under ``root`` except the manifest, as sorted relative POSIX paths. Links are
    refused: a bundle's content must be the bytes that were checksummed, not wherever a link points."""
    files = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            raise BundleError(f"bundle {root}: {rel} is a symbolic link; bundles hold plain files only")
        if path.is_file() and rel != MANIFEST:
            files.append(rel)
    return files


def checksums(root: Path) -> dict[str, str]:
    return {rel: sha256_file(root / rel) for rel in bundle_files(root)}


def is_bundle_dir(path: Path) -> bool:
    """Whether ``path`` looks like a bundle (its manifest says so), without verifying it."""
    try:
        return json.loads((Path(path) / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_manifest(root: Path) -> dict:
    root = Path(root)
    if not root.is_dir():
        raise BundleError(f"{root}: not a bundle directory (it does not exist or is a file)")
    path = root / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{root}: not a bundle ({MANIFEST} missing)") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise BundleError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise BundleError(f"{path}: not an ffcompile bundle manifest (format {got!r}, expected {FORMAT!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"{path}: bundle format version {version!r} is not supported by this ffcompile "
                          f"(it reads version {FORMAT_VERSION}); rebuild the bundle with this ffcompile")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise BundleError(f"{path}: manifest lacks {', '.join(missing)}")
    if not isinstance(manifest["files"], dict):
        raise BundleError(f"{path}: files: must map relative paths to sha256 digests")
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
