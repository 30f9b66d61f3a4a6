"""The ``ffcompile`` command line: ``main`` is the click group, with the training commands
(``main``) and the bundle commands (``bundle``) registered on it."""

from . import bundle  # noqa: F401  (registers build/run/verify/generate/finetune/targets)
from .main import main

__all__ = ["main"]
