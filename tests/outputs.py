"""Shared assertion of the backend tests: a backend's outputs equal the torch reference's."""

import numpy as np


def assert_outputs_match(got: dict, want: dict, atol: float, rtol: float) -> None:
    """Same names, shapes and dtypes; floats within atol + rtol*|ref|, everything else exact."""
    assert set(got) == set(want)
    for name, ref in want.items():
        out = got[name]
        assert out.shape == ref.shape, (name, out.shape, ref.shape)
        assert out.dtype == ref.dtype, (name, out.dtype, ref.dtype)
        if ref.dtype.kind == "f":
            np.testing.assert_allclose(out, ref, atol=atol, rtol=rtol, err_msg=name)
        else:
            np.testing.assert_array_equal(out, ref, err_msg=name)
