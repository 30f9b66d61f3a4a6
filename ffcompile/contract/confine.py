"""Keeping a bundle's reader inside the bundle: the names a manifest may use, and opening only
plain files under the bundle's folder (no symbolic links, FIFOs or devices on the way).

A name is a relative POSIX path of plain segments (letters, digits, ``_ . -``, not starting with
a dot): no absolute paths, no ``..``, no backslashes, no hidden files.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from ..core.errors import FFCompileError

_SEGMENT = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_NAME = re.compile(rf"{_SEGMENT}(/{_SEGMENT}){{0,7}}")


class ConfinementError(FFCompileError):
    pass


def is_plain_name(rel) -> bool:
    return isinstance(rel, str) and _NAME.fullmatch(rel) is not None


def check_name(rel, what: str) -> str:
    if not is_plain_name(rel):
        raise ConfinementError(f"{what}: {rel!r} is not a plain relative path inside the bundle "
                               "(no absolute paths, '..', backslashes or hidden names)")
    return rel


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def plain_files(root: Path) -> list[str]:
    """Every file under ``root`` as sorted relative POSIX paths, refusing anything that is not a
    plain folder or a regular file: a bundle's content must be the bytes that were checksummed,
    not wherever a link points, and reading a FIFO or a device could block or never end."""
    root = Path(root)
    top = os.lstat(root)
    if not stat.S_ISDIR(top.st_mode):
        raise ConfinementError(f"{root}: not a bundle directory ({_kind(top.st_mode)})")
    files = []

    def walk(folder: Path, prefix: str) -> None:
        with os.scandir(folder) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                rel = prefix + entry.name
                mode = entry.stat(follow_symlinks=False).st_mode
                if stat.S_ISDIR(mode):
                    walk(Path(entry.path), rel + "/")
                elif stat.S_ISREG(mode):
                    files.append(rel)
                else:
                    raise ConfinementError(f"bundle {root}: {rel} is {_kind(mode)}; bundles hold plain files only "
                                           "(a symbolic link, FIFO or device is refused)")
    walk(root, "")
    return files


def open_plain(path: Path) -> int:
    """A read-only descriptor of ``path`` if it is a regular file; never follows a final symbolic
    link and never blocks on a FIFO."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        if os.path.islink(path):
            raise ConfinementError(f"{path}: is a symbolic link; bundles hold plain files only") from None
        raise
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise ConfinementError(f"{path}: is {_kind(mode)}, not a regular file")
    return fd


def read_plain(path: Path, limit: int) -> bytes:
    """The bytes of the regular file ``path``, refused when larger than ``limit``."""
    fd = open_plain(path)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise ConfinementError(f"{path}: {size} bytes is larger than the {limit} bytes allowed for it")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ConfinementError(f"{path}: larger than the {limit} bytes allowed for it (it grew while read)")
    return data
