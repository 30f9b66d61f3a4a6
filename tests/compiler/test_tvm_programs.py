"""Every primitive the Builder offers, lowered to ONNX without Scan tiling and compiled by TVM
(LLVM, host CPU, our hand-written schedules), matches the torch reference backend on random fp32
inputs (atol = rtol = 1e-5; integer/bool outputs exactly). The one-op programs and their feeds
are the onnxruntime primitive tests' cases."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
from test_onnx_emit import CASES, PARAMS, _chain_program  # same folder: pytest puts it on sys.path

from ffcompile.compiler import onnx_emit as onnx_backend, tvm_build as tvm_compile
from ffcompile.runtime import tvm as tvm_runtime
from ffcompile.compiler.onnx_emit import to_onnx
from ffcompile.reference.interpreter import TorchProgram
from ffcompile.core.builder import Builder
from outputs import assert_outputs_match  # tests/outputs.py

ATOL = RTOL = 1e-5
HOST = {"kind": "llvm", "num-cores": 1}
DTYPES = {"float32": np.float32, "int64": np.int64, "bool": np.bool_}

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # the ONNX importer renames dotted names


def _check(program, feeds, tmp_path):
    lib = tvm_compile.compile_onnx(to_onnx(program, fuse=False), HOST, tmp_path / f"{program.name}.so")
    got = tvm_runtime.load(lib).run(feeds)
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


def test_hybrid_mask_blur_compiles_with_bounded_inlining(monkeypatch, tmp_path):
    """The hybrid negatives' mask is blurred by 12 three-tap passes. Inlining each pass into the
    next copies its expression three times (3^12 terms at the end; the unsupervised train step
    did not compile in 25 minutes); the hand schedule stops inlining before a block body grows
    past ``MAX_BODY_CHARS``, and the masks and negatives still equal the reference exactly."""
    from ffcompile.lowering import build_program
    from ffcompile.core.spec import load_model

    log: list = []
    monkeypatch.setattr(tvm_compile, "_SCHED_LOG", log)
    model = load_model(Path(__file__).parents[2] / "models" / "mnist-unsupervised.toml")
    program = build_program(model, "hybrid_negatives", 4)
    rng = np.random.default_rng(0)
    feeds = {"x": rng.random((4, 784), dtype=np.float32), "x_other": rng.random((4, 784), dtype=np.float32),
             "mask_bits": rng.integers(0, 2, (4, 784)).astype(np.float32)}
    lib = tvm_compile.compile_onnx(to_onnx(program, fuse=False), HOST, tmp_path / "hybrid.so")
    got, want = tvm_runtime.load(lib).run(feeds), TorchProgram(program).run_numpy(feeds)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    skipped = [line for entry in log for line in entry["log"] if "a body would grow" in line]
    assert skipped, "no inlining was stopped: the blur chain was fully inlined"


def test_a_library_rebuilt_at_the_same_path_is_the_new_one(tmp_path):
    """dlopen hands a process the library it first loaded from a path; ``load`` must not."""
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    path = tmp_path / "prog.so"
    for scale in (2.0, 3.0):
        b = Builder("scale")
        b.output("y", b.mul(b.input("x", (2, 3)), scale))
        tvm_compile.compile_onnx(to_onnx(b.build(), fuse=False), HOST, path)
        np.testing.assert_array_equal(tvm_runtime.load(path).run({"x": x})["y"], scale * x)


@pytest.fixture(scope="module")
def scale_library(tmp_path_factory):
    b = Builder("scale")
    b.output("y", b.mul(b.input("x", (2, 3)), 2.0))
    return tvm_compile.compile_onnx(to_onnx(b.build(), fuse=False), HOST, tmp_path_factory.mktemp("scale") / "prog.so")


@pytest.mark.parametrize("env,want", [({}, None), ({"TVM_NUM_THREADS": "1"}, 1), ({"OMP_NUM_THREADS": "1"}, 1)])
def test_loaded_programs_run_on_every_usable_core_unless_told(env, want, scale_library):
    """TVM's default pool is half the logical CPUs on x86 (it assumes SMT), and a one-thread pool
    pins the thread that made it to one CPU: on a 2-core VM without SMT, programs run on one core,
    and so does every torch reference step after them in the same process. Loading a program
    sizes the pool to the usable physical cores; TVM_NUM_THREADS or OMP_NUM_THREADS, when set,
    still decide. Either way the process may still run on every CPU it could before. Fresh
    processes: the pool is sized once per process."""
    import os
    import subprocess
    import sys

    script = ("import os, sys, numpy, tvm; from ffcompile.runtime import tvm as t; "
              "cores, cpus = t.usable_cores(), os.sched_getaffinity(0); "
              "t.load(sys.argv[1]).run({'x': numpy.ones((2, 3), numpy.float32)}); "
              "print(tvm.get_global_func('runtime.NumThreads')(), cores, os.sched_getaffinity(0) == cpus)")
    clean = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", script, str(scale_library)], env={**clean, **env}, capture_output=True,
                         text=True, check=True).stdout.split()
    threads, cores, affinity_kept = int(out[-3]), int(out[-2]), out[-1]
    assert threads == (want or cores)
    assert affinity_kept == "True"
