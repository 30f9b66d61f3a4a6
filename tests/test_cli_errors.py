"""One error path for the CLI: user errors are one line with exit 1 or 2, never a traceback; a
real bug prints its traceback and asks to report it."""

import struct

import numpy as np
import pytest

from cli_helpers import error_line, invoke  # tests/cli_helpers.py


def last_error_line(result) -> str:
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("error: "), result.output
    return line


@pytest.mark.parametrize("args,needle", [
    (["--limit", "5"], "--limit 5 is less than one batch of 20"),
    (["--eval-every", "0"], "--eval-every must be >= 1"),
    (["--device", "tpu"], "--device"),
])
def test_train_option_errors(tiny_spec, tmp_path, args, needle):
    result = invoke("train", tiny_spec, "--out", tmp_path / "run", "--epochs", "1", *args, "--no-progress")
    assert needle in last_error_line(result)


def test_finetune_limit_below_one_batch(tiny_bundle, tmp_path):
    result = invoke("finetune", tiny_bundle, "--epochs", "1", "--limit", "5", "--out", tmp_path / "ft", "--no-progress")
    assert "--limit 5 is less than one batch of 20" in error_line(result)


def lying_npy(path, shape, data_bytes):
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': %r, }" % (shape,)
    header = header + " " * (63 - (len(header) + 10) % 64) + "\n"
    path.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + b"\0" * data_bytes)
    return path


@pytest.mark.parametrize("shape,data", [((10, 784), 100), ((10**9, 784), 4 * 784), ((2**62, 2**62), 0)])
def test_npy_whose_header_lies_refused(tiny_bundle, tmp_path, shape, data):
    path = lying_npy(tmp_path / "x.npy", shape, data)
    line = error_line(invoke("run", tiny_bundle, "--input", path))
    assert "--input" in line and "x.npy" in line, line


def test_images_outside_0_1_refused_unless_scaled(tiny_bundle, tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (5, 784)).astype(np.float32)
    np.save(tmp_path / "x255.npy", x)
    line = error_line(invoke("run", tiny_bundle, "--input", tmp_path / "x255.npy"))
    assert "outside [0, 1]" in line and "--input-scale" in line, line
    result = invoke("run", tiny_bundle, "--input", tmp_path / "x255.npy", "--input-scale", "255", "--json")
    assert result.exit_code == 0, result.output
    assert "must be a positive" in error_line(invoke("run", tiny_bundle, "--input", tmp_path / "x255.npy",
                                                     "--input-scale", "0"))


def test_a_real_bug_prints_a_traceback_and_asks_for_a_report(tiny_spec, monkeypatch):
    import ffcompile.core.spec

    def broken(path):
        raise ZeroDivisionError("simulated bug")
    monkeypatch.setattr(ffcompile.core.spec, "load_model", broken)
    result = invoke("inspect", tiny_spec)
    assert result.exit_code == 3, result.output
    assert "Traceback" in result.output and "ZeroDivisionError" in result.output
    assert "bug in ffcompile" in result.output and "report" in result.output


def test_usage_errors_exit_2(tiny_spec):
    result = invoke("train", tiny_spec)
    assert result.exit_code == 2 and "Traceback" not in result.output
