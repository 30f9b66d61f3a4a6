"""The reference backend drops each intermediate after its last reader: outputs (including ones
that later nodes also read) are kept, and results are those of keeping everything."""

import numpy as np

from ffcompile.reference.interpreter import TorchProgram
from ffcompile.core.builder import Builder


def test_intermediates_are_released_after_their_last_use_and_outputs_kept():
    b = Builder("chain")
    x = b.input("x", (3, 4))
    squared = b.mul(x, x)  # read twice by one node, then again later
    shifted = b.add(squared, squared)
    b.output("squared", squared)
    b.output("result", b.relu(b.sub(shifted, b.mul(squared, 0.5))))
    program = b.build()
    runner = TorchProgram(program)
    released = {name for names in runner.release.values() for name in names}
    assert "squared" not in released and "result" not in released
    assert shifted.name in released and "x" in released
    feeds = {"x": np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)}
    got = runner.run_numpy(feeds)
    keep_all = TorchProgram(program)
    keep_all.release = {}
    want = keep_all.run_numpy(feeds)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
    np.testing.assert_allclose(got["result"], 1.5 * feeds["x"] ** 2, rtol=1e-6)
