"""The CIFAR-10 recurrent local net (sec. 4) compiled by TVM (LLVM, host CPU): every program in both
local lowerings passes the parity harness against the torch reference — programs on random and
real inputs (fp32: 1e-5 abs + 1e-5 rel) and a 5-step training trajectory (1e-4 rel). Toy size:
3x3x3 images, two 3x3 maps of 2 units per location, 3x3 fields with padding 1, 2 iterations."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from ffcompile.compiler import tvm_build as tvm_compile
from ffcompile.runtime import tvm as tvm_runtime
from ffcompile.compiler.onnx_emit import to_onnx
from ffcompile.lowering import build_program, init_state, local
from ffcompile.reference.parity import verify

sys.path.insert(0, str(Path(__file__).parents[1] / "lowering"))
from test_cifar_recurrent import tiny  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # the ONNX importer renames dotted names
PROGRAMS = ("train_step", "infer_goodness", "infer_softmax")


@pytest.mark.parametrize("form", local.FORMS)
def test_tvm_programs_and_trajectory_match_the_reference(form, tmp_path):
    model = tiny(side=3, iterations=2)
    batch = model.training.batch_size
    rng = np.random.default_rng(0)
    x = rng.random((4 * batch, model.input.size), dtype=np.float32)
    y = rng.integers(0, model.input.label.classes, 4 * batch).astype(np.int64)
    with local.lowering_form(form):
        runners = {}
        for name in PROGRAMS:
            lib = tvm_compile.compile_onnx(to_onnx(build_program(model, name, batch), fuse=False),
                                           {"kind": "llvm", "num-cores": 1}, tmp_path / f"{name}.so")
            runners[name] = tvm_runtime.load(lib)
        params, state = init_state(model, seed=1)
        report = verify(model, {"name": "host-tvm", "backend": "tvm"}, runners, params, state, 0, x, y,
                        infer_batch=batch, steps=5)
    failed = [(p["program"], p["inputs"]) for p in report["programs"] if not p["passed"]]
    assert not failed, failed
    assert {(p["program"], p["inputs"]) for p in report["programs"]} == {(n, k) for n in PROGRAMS for k in ("random", "real")}
    assert report["trajectory"]["passed"] and report["summary"]["trajectory"]["within_strict_tolerance"]
    assert report["passed"]
