"""The pages that show measured numbers are what their tools make from the results' JSON: no
number on them is typed by hand, and none is left behind when a result changes."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]


@pytest.mark.parametrize("command", [
    ["bench/results_page.py", "--check"],
    ["bench/bench_distributed.py", "--report", "docs/results/distributed.json", "--page", "docs/distributed.md", "--check"],
    ["bench/dtypes_page.py", "--check"],
    ["bench/report_step.py", "docs/results/step.json", "--epoch", "docs/results/train-epoch.json", "--check"],
])
def test_page_is_what_its_json_makes(command):
    result = subprocess.run([sys.executable, *command], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)}: page out of date; rerun without --check\n{result.stderr}"
