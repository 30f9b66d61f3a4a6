"""ffcompile: a compiler and toolkit for networks trained with the Forward-Forward algorithm."""

__version__ = "0.1.0"
