"""Shared by the CLI tests: run ``ffcompile`` in-process, check success or a user error's one line."""

from click.testing import CliRunner

from ffcompile.cli import main


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def succeeded(result):
    """The result of a command that must succeed (exit 0, no traceback), for chaining."""
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    return result


def error_line(result) -> str:
    """The single ``error: ...`` line a user error prints (exit 1, nothing else, no traceback)."""
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def assert_user_error(result, needle):
    assert result.exit_code != 0
    out = result.output.strip()
    assert "Traceback" not in out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out
    assert needle in errors[0], out
