"""One writer per output folder (a training run, a fine-tuning run, a bundle): an exclusive
``fcntl`` lock on ``.<name>.lock`` beside the folder, held while the command writes. The lock
lives beside the folder, not in it, because a rebuild replaces the whole bundle folder. The
kernel drops the lock when its process dies, so a killed run never blocks the next one; and
while the lock is held, anything a killed writer left behind can be removed safely. The lock file
is removed when the writer finishes (a lock taken on a file that was removed meanwhile is retried
on the new one)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from pathlib import Path

from ..core.errors import FFCompileError


def lock_path(folder: Path) -> Path:
    folder = Path(folder)
    return folder.parent / f".{folder.name}.lock"


@contextlib.contextmanager
def exclusive(folder, what: str):
    """Hold the lock of ``folder`` (``what`` names the command, for the other writer's message)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    path = lock_path(folder)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise FFCompileError(f"{folder} is in use by another ffcompile process ({holder}); "
                                 "wait for it to finish, or choose another output folder") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder before us removed this lock file: lock the current one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, {what}".encode(), 0)
        yield
    finally:
        os.unlink(path)
        os.close(fd)


def remove_stale(folder: Path, patterns: tuple[str, ...], log=None) -> list[Path]:
    """Remove what killed writers left in ``folder`` matching ``patterns`` (call with the lock held)."""
    removed = []
    for pattern in patterns:
        for path in Path(folder).glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    if removed and log is not None:
        log(f"removed {len(removed)} leftover(s) of an interrupted run: {', '.join(p.name for p in removed)}")
    return removed
