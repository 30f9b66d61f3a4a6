"""The one exception users see: the CLI prints its message on one line and exits non-zero."""


class FFCompileError(Exception):
    """A user-facing error (bad spec, missing data, tampered bundle, ...). No traceback is shown."""
