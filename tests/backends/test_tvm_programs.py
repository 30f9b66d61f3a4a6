"""Every primitive the Builder offers, lowered to ONNX without Scan tiling and compiled by TVM
(LLVM, host CPU, our hand-written schedules), matches the torch reference backend on random fp32
inputs (atol = rtol = 1e-5; integer/bool outputs exactly). The one-op programs and their feeds
are the onnxruntime primitive tests' cases."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from test_onnx_primitives import CASES, PARAMS, _chain_program  # same folder: pytest puts it on sys.path

from ffcompile.backends import onnx_backend, tvm_compile
from ffcompile.backends.onnx_backend import to_onnx
from ffcompile.backends.torch_backend import TorchProgram
from ffcompile.program.builder import Builder
from outputs import assert_outputs_match  # tests/outputs.py

ATOL = RTOL = 1e-5
HOST = {"kind": "llvm", "num-cores": 1}
DTYPES = {"float32": np.float32, "int64": np.int64, "bool": np.bool_}

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # the ONNX importer renames dotted names


def _check(program, feeds, tmp_path):
    lib = tvm_compile.compile_onnx(to_onnx(program, fuse=False), HOST, tmp_path / f"{program.name}.so")
    got = tvm_compile.load(lib).run(feeds)
    want = TorchProgram(program).run_numpy(feeds)
    assert_outputs_match(got, want, ATOL, RTOL)


@pytest.mark.parametrize("op,case", PARAMS)
def test_primitive_matches_torch(op, case, tmp_path):
    rng = np.random.default_rng(zlib.crc32(f"{op}/{case}".encode()))
    b = Builder(f"one_{op}")
    feeds = CASES[op][case](b, rng)
    program = b.build()
    feeds = {v.name: np.asarray(feeds[v.name]).astype(DTYPES[v.dtype]) for v in program.inputs}
    _check(program, feeds, tmp_path)


def test_tvm_gets_no_scan_and_matches(monkeypatch, tmp_path):
    """A long elementwise chain over a large value: onnxruntime's emitter tiles it into a Scan,
    which TVM's ONNX frontend cannot import; ``fuse=False`` (what the tvm compiler uses) does not."""
    monkeypatch.setattr(onnx_backend, "FUSE_MIN_ELEMS", 1024)  # small shapes, the 2000x2000 code path
    monkeypatch.setattr(onnx_backend, "TILE_ELEMS", 512)
    program, feeds = _chain_program()
    assert any(n.op_type == "Scan" for n in to_onnx(program).graph.node)
    assert not any(n.op_type == "Scan" for n in to_onnx(program, fuse=False).graph.node)
    _check(program, feeds, tmp_path)
