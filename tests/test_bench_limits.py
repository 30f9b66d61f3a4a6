"""What bench/bench_step.py measures of the machine beside the step (the step's matmul products
alone, the weight reads of its sweeps) and what bench/report_step.py concludes from them."""

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).parents[1]
sys.path[:0] = [str(REPO / "bench"), str(REPO / "tools")]

import bench_step  # noqa: E402
import report_step  # noqa: E402


@pytest.fixture(scope="module")
def small_step():
    return bench_step.B.program(bench_step.B.load(bench_step.MODELS["2x500"]), "train_step", 4)


def test_weight_reads_count_every_matmul_that_takes_a_weight(small_step):
    # h1 (500 x 784) and h2 (500 x 500): the neutral and the positive/negative pass; the softmax
    # readout (10 x 500): the neutral pass only
    assert bench_step.weight_reads_bytes(small_step) == 4 * (2 * 500 * 784 + 2 * 500 * 500 + 10 * 500)


def test_matmul_products_are_the_steps_own(small_step):
    run = bench_step.matmul_products(small_step, threads=1)
    nodes = [n for n in small_step.nodes if n.op == "matmul"]
    assert [tuple(out.shape) for _, _, out in run.products] == [tuple(n.output.shape) for n in nodes]
    run()
    for (a, b, out), n in zip(run.products, nodes):
        for operand, transposed in ((a, n.attrs.get("trans_a")), (b, n.attrs.get("trans_b"))):
            # a transposed operand as a view of the stored matrix, as MKL takes it
            assert operand.stride() == ((1, operand.shape[0]) if transposed else (operand.shape[1], 1))
        np.testing.assert_allclose(out.numpy(), (a @ b).numpy(), rtol=1e-5, atol=1e-4)


def _run(hand_ms: float, products_ms: float) -> tuple[dict, dict]:
    """A run at a 100 GFLOP/s peak of a step with 2 GFLOP of matmuls (20 ms at the peak)."""
    row = {"layers": "2x500", "batch": 1, "matmul_flops": 2e9,
           "variants": {"tvm": {"median_ms": 30.0}, "torch_hand": {"median_ms": hand_ms}},
           "bandwidth_bound_ms": 10.0, "sweep_bound_ms": 14.0,
           "matmul_products": {"median_ms": products_ms, "percent_of_sgemm_peak": 100 * 20 / products_ms}}
    return {"peak": {"sgemm_peak_gflops": 100.0}}, row


def test_a_2x_goal_below_the_peak_floor_is_out_of_reach():
    d, row = _run(hand_ms=35.0, products_ms=25.0)  # half of eager, 17.5 ms, is below 20 ms at the peak
    assert "out of reach here: the step's matmul FLOPs alone take 20 ms at the SGEMM peak" in report_step.out_of_reach(d, row, "2x")


def test_a_2x_goal_below_the_sgemm_librarys_time_says_so():
    d, row = _run(hand_ms=48.0, products_ms=25.0)  # 24 ms: above the peak floor, below torch.mm's 25
    assert "the matmul products alone take 25 ms in torch.mm" in report_step.out_of_reach(d, row, "2x")


def test_a_reachable_2x_goal_gets_no_excuse():
    d, row = _run(hand_ms=70.0, products_ms=25.0)
    assert report_step.out_of_reach(d, row, "2x") == ""


def test_bandwidth_goal_below_the_sweep_bound_is_out_of_reach():
    d, row = _run(hand_ms=70.0, products_ms=25.0)  # sweep bound 1.4x the bandwidth bound
    assert "1.40x the bound" in report_step.out_of_reach(d, row, "bandwidth")
    row["sweep_bound_ms"] = 12.0
    assert report_step.out_of_reach(d, row, "bandwidth") == ""
