"""What bench/bench_step.py measures of the machine beside the step (the step's matmul products
alone, the sweep bound), and what bench/report_step.py concludes from it, run as a user runs them."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
COMPILED = ("tvm", "tvm_native", "ort")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "step.json"
    r = subprocess.run([sys.executable, "bench/bench_step.py", "--sizes", "2x500/1", "--repeats", "1", "--sample-ms", "5",
                        "--no-memory", "--no-compile", "--out", str(out)], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text())


def test_the_steps_matmul_products_are_timed_alone(quick_run):
    products = quick_run["sizes"][0]["matmul_products"]
    assert products["median_ms"] > 0 and 0 < products["percent_of_sgemm_peak"] < 150


def test_sweep_bound_adds_the_forward_passes_weight_reads(quick_run):
    row = quick_run["sizes"][0]
    # h1 (500 x 784): once, the passes sharing its product with the images, and its 10 label
    # columns in the neutral and the positive/negative pass; h2 (500 x 500): in both passes; the
    # softmax readout (10 x 500): the neutral pass only
    weights = 4 * (500 * 784 + 2 * 500 * 10 + 2 * 500 * 500 + 10 * 500)
    moved = 2 * row["params_and_state_bytes"]
    assert row["sweep_bound_ms"] / row["bandwidth_bound_ms"] == pytest.approx((moved + weights) / moved)


def _goals(run: dict, tmp_path: Path) -> str:
    """The goal lines report_step.py writes for ``run``."""
    (tmp_path / "step.json").write_text(json.dumps(run))
    (tmp_path / "README.md").write_text("<!-- speed-table:start -->\n<!-- speed-table:end -->\n")
    r = subprocess.run([sys.executable, "bench/report_step.py", str(tmp_path / "step.json"), "--page",
                        str(tmp_path / "performance.md"), "--readme", str(tmp_path / "README.md")],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    page = (tmp_path / "performance.md").read_text()
    return page[page.index("### The goals"):]


def _timed(run: dict, compiled_ms: float, hand_ms: float, products_ms: float, peak_ms: float) -> dict:
    """``run`` with its one size's times replaced: the compiled variants, hand-written eager, the
    matmul products alone, and the matmul FLOPs at the SGEMM peak."""
    run = copy.deepcopy(run)
    row = run["sizes"][0]
    for key in COMPILED:
        row["variants"][key]["median_ms"] = compiled_ms
    row["variants"]["torch_hand"]["median_ms"] = hand_ms
    row["matmul_products"]["median_ms"] = products_ms
    row["matmul_flops"] = peak_ms / 1e3 * run["peak"]["sgemm_peak_gflops"] * 1e9
    return run


def test_a_2x_goal_below_the_peak_floor_is_called_out_of_reach(quick_run, tmp_path):
    goals = _goals(_timed(quick_run, compiled_ms=30, hand_ms=35, products_ms=25, peak_ms=20), tmp_path)
    assert "out of reach here: the step's matmul FLOPs alone take 20 ms at the SGEMM peak" in goals


def test_a_2x_goal_below_the_sgemm_librarys_time_says_so(quick_run, tmp_path):
    goals = _goals(_timed(quick_run, compiled_ms=30, hand_ms=48, products_ms=25, peak_ms=20), tmp_path)
    assert "the matmul products alone take 25 ms in torch.mm" in goals


def test_a_reachable_2x_goal_gets_no_reason(quick_run, tmp_path):
    goals = _goals(_timed(quick_run, compiled_ms=30, hand_ms=57, products_ms=25, peak_ms=20), tmp_path)
    assert "**no** (1.90x)" in goals


@pytest.mark.parametrize("sweep", [1.33, 1.23])
def test_a_bandwidth_goal_below_the_sweep_bound_is_called_out_of_reach(quick_run, tmp_path, sweep):
    run = copy.deepcopy(quick_run)
    row = run["sizes"][0]
    row["sweep_bound_ms"] = sweep * row["bandwidth_bound_ms"]
    goals = _goals(run, tmp_path)
    assert ("put the least time at 1.33x the bound" in goals) == (sweep > 1.3)
    assert ("out of reach as defined" in goals) == (sweep > 1.3)
