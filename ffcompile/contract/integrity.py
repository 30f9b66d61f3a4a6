"""One digest for a whole bundle, and optional ed25519 signatures over it.

The bundle digest is ``sha256:`` + sha256(``ffcompile-bundle-digest-1\\n`` + the bytes of
manifest.json). The manifest holds the sha256 of every other file and loading refuses files it
does not list, so the digest pins every byte of the bundle. It is written as ``bundle.digest``
(any change to the manifest, even one bit, no longer matches it) and printed by ``build``; a
device can pin it (``--digest``) or require a signature over it by a known key (``--trust``):
``bundle.sig`` holds the signer's public key and the ed25519 signature of
``ffcompile-bundle-signature-1\\n`` + the digest.

Keys (``ffcompile keygen KEY``): KEY is the private key (PKCS#8 PEM, owner-only), KEY.pub the
public key as one line ``ffcompile-ed25519 <64 hex digits>``. Signing and checking signatures
use the ``cryptography`` package.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from ..core.errors import FFCompileError
from .confine import read_plain

DIGEST_FILE = "bundle.digest"
SIGNATURE_FILE = "bundle.sig"
UNLISTED = (DIGEST_FILE, SIGNATURE_FILE)  # beside the manifest, outside its file list
_DIGEST_DOMAIN = b"ffcompile-bundle-digest-1\n"
_SIGNATURE_DOMAIN = b"ffcompile-bundle-signature-1\n"
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_PUBLIC_PREFIX = "ffcompile-ed25519 "
_SMALL = 4096  # bytes: digest, signature and public key files are far smaller


class IntegrityError(FFCompileError):
    pass


MANIFEST = "manifest.json"


def digest_of(manifest_bytes: bytes) -> str:
    return "sha256:" + hashlib.sha256(_DIGEST_DOMAIN + manifest_bytes).hexdigest()


def write_digest(root: Path, manifest_bytes: bytes | None = None) -> str:
    root = Path(root)
    digest = digest_of((root / MANIFEST).read_bytes() if manifest_bytes is None else manifest_bytes)
    (root / DIGEST_FILE).write_text(digest + "\n")
    return digest


def check_digest_text(text: str, what: str) -> str:
    if not _DIGEST.fullmatch(text):
        raise IntegrityError(f"{what}: {text[:80]!r} is not a bundle digest (sha256: and 64 lowercase hex digits)")
    return text


def check_integrity(root: Path, manifest_bytes: bytes, trust=None, digest: str | None = None) -> str:
    """The bundle's digest after checking it against ``bundle.digest``, against ``digest`` (if
    given) and, with ``trust`` (a public key file), the signature in ``bundle.sig``."""
    root = Path(root)
    actual = digest_of(manifest_bytes)
    path = root / DIGEST_FILE
    if not os.path.lexists(path):
        raise IntegrityError(f"bundle {root}: {DIGEST_FILE} is missing; rebuild the bundle with this ffcompile")
    written = read_plain(path, _SMALL).decode("ascii", "replace").strip()
    if written != actual:
        raise IntegrityError(f"bundle {root}: manifest.json does not match the bundle digest in {DIGEST_FILE} "
                             f"(expected {written[:23]}…, got {actual[:23]}…); the bundle was changed or damaged")
    if digest is not None and check_digest_text(digest, "--digest") != actual:
        raise IntegrityError(f"bundle {root}: its digest {actual} is not the required {digest}")
    if trust is not None:
        check_signature(root, actual, read_public_key(trust))
    return actual


def read_public_key(path) -> bytes:
    path = Path(path)
    try:
        text = read_plain(path, _SMALL).decode("ascii").strip()
    except FileNotFoundError:
        raise IntegrityError(f"{path}: public key file not found") from None
    except UnicodeDecodeError:
        text = ""
    if not text.startswith(_PUBLIC_PREFIX) or not re.fullmatch(r"[0-9a-f]{64}", text[len(_PUBLIC_PREFIX):]):
        raise IntegrityError(f"{path}: not an ffcompile public key (one line '{_PUBLIC_PREFIX}<64 hex digits>', "
                             "as `ffcompile keygen` writes in KEY.pub)")
    return bytes.fromhex(text[len(_PUBLIC_PREFIX):])


def check_signature(root: Path, digest: str, public_key: bytes) -> None:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    path = root / SIGNATURE_FILE
    if not os.path.lexists(path):
        raise IntegrityError(f"bundle {root}: not signed ({SIGNATURE_FILE} missing), but a signature by "
                             f"{fingerprint(public_key)} is required")
    try:
        sig = json.loads(read_plain(path, _SMALL))
        key, signature = bytes.fromhex(sig["key"]), bytes.fromhex(sig["signature"])
    except (ValueError, KeyError, TypeError, AttributeError):
        raise IntegrityError(f"bundle {root}: {SIGNATURE_FILE} is not a readable signature") from None
    if key != public_key:
        raise IntegrityError(f"bundle {root}: signed by {fingerprint(key)}, not by the trusted key {fingerprint(public_key)}")
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, _SIGNATURE_DOMAIN + digest.encode())
    except (InvalidSignature, ValueError):
        raise IntegrityError(f"bundle {root}: the signature in {SIGNATURE_FILE} does not match the bundle "
                             "(changed after signing, or a forged signature)") from None


def fingerprint(public_key: bytes) -> str:
    return "ed25519:" + hashlib.sha256(public_key).hexdigest()[:16]


def load_private_key(path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    path = Path(path)
    try:
        key = load_pem_private_key(read_plain(path, _SMALL), password=None)
    except FileNotFoundError:
        raise IntegrityError(f"{path}: signing key file not found") from None
    except (ValueError, TypeError):
        raise IntegrityError(f"{path}: not an unencrypted PEM private key (as `ffcompile keygen` writes)") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise IntegrityError(f"{path}: not an ed25519 private key")
    return key


def public_bytes(private_key) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def sign_bundle(root: Path, digest: str, private_key) -> str:
    """Write ``bundle.sig`` for ``digest``; returns the signer's fingerprint."""
    signature = private_key.sign(_SIGNATURE_DOMAIN + digest.encode())
    key = public_bytes(private_key)
    (Path(root) / SIGNATURE_FILE).write_text(json.dumps({"format": "ffcompile-signature-1", "key": key.hex(),
                                                         "signature": signature.hex()}) + "\n")
    return fingerprint(key)


def keygen(path) -> tuple[Path, Path, str]:
    """A new ed25519 key pair: ``path`` (private, mode 0600) and ``path``.pub; refuses to overwrite."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    path = Path(path)
    pub = path.with_name(path.name + ".pub")
    for p in (path, pub):
        if os.path.lexists(p):
            raise IntegrityError(f"{p}: exists; refusing to overwrite a key (choose another name)")
    path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public = public_bytes(key)
    pub.write_text(_PUBLIC_PREFIX + public.hex() + "\n")
    return path, pub, fingerprint(public)
