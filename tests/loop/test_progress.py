"""Progress of a long step: a live line on a terminal, and one plain line with the elapsed seconds
when the step ends, whether or not there is a terminal; none for a step that failed."""

import pytest

from ffcompile.loop.progress import Phase


def test_a_finished_step_logs_one_plain_line_with_its_seconds(capsys):
    lines = []
    with Phase("compile train_step", False, lines.append):
        pass
    assert len(lines) == 1 and lines[0].startswith("compile train_step: ") and lines[0].endswith(" s")
    assert capsys.readouterr().err == ""  # no live line without a terminal


def test_a_terminal_gets_a_live_counting_line_and_a_failed_step_no_time_line(capsys):
    lines = []
    with pytest.raises(RuntimeError):
        with Phase("emulated aarch64: 3 training steps", True, lines.append, total=3) as phase:
            phase.advance()
            raise RuntimeError("device gone")
    assert lines == []
    err = capsys.readouterr().err
    assert "\remulated aarch64: 3 training steps: 0/3 00:00" in err
