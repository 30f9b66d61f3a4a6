"""Where the target and model specs are: the checkout's top-level ``targets/`` and ``models/``
folders (the source of truth), or in an installed wheel the copies under ``ffcompile/shipped/``
(written by setup.py at build time)."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parents[1]  # ffcompile/


def spec_dir(kind: str) -> Path:
    """``kind``: "targets" or "models"."""
    installed = _PACKAGE / "shipped" / kind
    return installed if installed.is_dir() else _PACKAGE.parent / kind


def shipped_model(name: str) -> Path | None:
    """The shipped model spec called ``name`` (``mnist-small``), if there is one."""
    if not name or "/" in name or "\\" in name or name.startswith("."):
        return None
    path = spec_dir("models") / f"{name}.toml"
    return path if path.is_file() else None
