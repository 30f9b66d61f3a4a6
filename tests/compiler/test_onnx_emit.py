"""Every primitive the Builder offers, lowered to ONNX and run in onnxruntime, matches the torch
reference backend on random fp32 inputs (atol = rtol = 1e-6, integer/bool outputs exactly); and
the emitter's rewrites (output copies dropped, bias folded into Gemm, outer products as
broadcasts, tiled elementwise chains as Scan) leave results unchanged."""

from __future__ import annotations

import zlib

import numpy as np
import onnx
import pytest

from ffcompile.compiler import onnx_emit as onnx_backend
from ffcompile.compiler.onnx_emit import to_onnx
from ffcompile.reference.interpreter import TorchProgram
from ffcompile.core.builder import Builder
from ffcompile.core.primitives import PRIMITIVES
from ffcompile.runtime.ort import OrtProgram
from outputs import assert_outputs_match  # tests/outputs.py

ATOL = RTOL = 1e-6


def _uniform(rng, shape, lo=-2.0, hi=2.0):
    return rng.uniform(lo, hi, size=shape).astype(np.float32)


# Each case: builds a one-primitive program (plus inputs/outputs) and returns its feeds.
def _matmul(trans_a, trans_b, k=7):
    def case(b, rng):
        a_shape, b_shape = ((k, 5) if trans_a else (5, k)), ((6, k) if trans_b else (k, 6))
        a, w = b.input("a", a_shape), b.input("b", b_shape)
        b.output("out", b.matmul(a, w, trans_a=trans_a, trans_b=trans_b))
        return {"a": _uniform(rng, a_shape), "b": _uniform(rng, b_shape)}
    return case


def _binary(op, a_shape=(4, 5), b_shape=(5,), nonzero_b=False):
    def case(b, rng):
        x, y = b.input("a", a_shape), b.input("b", b_shape)
        b.output("out", getattr(b, op)(x, y))
        other = _uniform(rng, b_shape)
        if nonzero_b:  # |b| in [0.5, 2], either sign
            other = (np.sign(other) + (other == 0)) * _uniform(rng, b_shape, 0.5, 2.0)
        return {"a": _uniform(rng, a_shape), "b": other.astype(np.float32)}
    return case


def _unary(op, lo=-3.0, hi=3.0, shape=(3, 8)):
    def case(b, rng):
        x = b.input("x", shape)
        b.output("out", getattr(b, op)(x))
        data = _uniform(rng, shape, lo, hi)
        if op == "step":
            data.flat[::3] = 0.0  # the boundary: step(0) = 0
        return {"x": data}
    return case


def _with(build, feeds):
    def case(b, rng):
        build(b)
        return feeds(rng)
    return case


def _argmax_feeds(rng):
    x = _uniform(rng, (4, 6))
    x[1, 2] = x[1, 4] = x[1].max() + 1  # a tie: the first index wins in both backends
    return {"x": x}


CASES = {
    "identity": [_unary("identity")],
    "matmul": [_matmul(False, False), _matmul(True, False), _matmul(False, True), _matmul(True, True),
               _matmul(False, False, k=1), _matmul(True, True, k=1)],  # k = 1: emitted as a broadcast Mul
    "add": [_binary("add"), _binary("add", (4, 1), (1, 5)), _binary("add", (4, 5), ())],
    "sub": [_binary("sub"), _binary("sub", (3,), (2, 3))],
    "mul": [_binary("mul"), _binary("mul", (4, 5), (4, 1))],
    "div": [_binary("div", nonzero_b=True), _binary("div", (2, 3), (), nonzero_b=True)],
    "neg": [_unary("neg")],
    "maximum": [_binary("maximum"), _binary("maximum", (4, 5), ())],
    "minimum": [_binary("minimum"), _binary("minimum", (4, 1), (5,))],
    "relu": [_unary("relu")],
    "sigmoid": [_unary("sigmoid", -20, 20)],
    "exp": [_unary("exp", -10, 10)],
    "log": [_unary("log", 1e-3, 50)],
    "sqrt": [_unary("sqrt", 0.0, 50)],
    "abs": [_unary("abs")],
    "tanh": [_unary("tanh", -20.0, 20.0)],
    "step": [_unary("step")],
    "reduce_sum": [
        _with(lambda b: b.output("out", b.reduce_sum(b.input("x", (3, 4, 5)), [1])), lambda r: {"x": _uniform(r, (3, 4, 5))}),
        _with(lambda b: b.output("out", b.reduce_sum(b.input("x", (3, 4, 5)), [0, 2], keepdims=True)),
              lambda r: {"x": _uniform(r, (3, 4, 5))}),
    ],
    "reduce_max": [
        _with(lambda b: b.output("out", b.reduce_max(b.input("x", (3, 4)), [-1])), lambda r: {"x": _uniform(r, (3, 4))}),
        _with(lambda b: b.output("out", b.reduce_max(b.input("x", (3, 4, 2)), [0, 1], keepdims=True)),
              lambda r: {"x": _uniform(r, (3, 4, 2))}),
    ],
    "reshape": [_with(lambda b: b.output("out", b.reshape(b.input("x", (4, 6)), [2, 3, 4])), lambda r: {"x": _uniform(r, (4, 6))})],
    "transpose": [
        _with(lambda b: b.output("out", b.transpose(b.input("x", (4, 6)), [1, 0])), lambda r: {"x": _uniform(r, (4, 6))}),
        _with(lambda b: b.output("out", b.transpose(b.input("x", (2, 3, 4)), [2, 0, 1])), lambda r: {"x": _uniform(r, (2, 3, 4))}),
    ],
    "concat": [
        _with(lambda b: b.output("out", b.concat([b.input("a", (2, 3)), b.input("b", (4, 3))], 0)),
              lambda r: {"a": _uniform(r, (2, 3)), "b": _uniform(r, (4, 3))}),
        _with(lambda b: b.output("out", b.concat([b.input("a", (2, 3)), b.input("b", (2, 1)), b.input("c", (2, 2))], -1)),
              lambda r: {"a": _uniform(r, (2, 3)), "b": _uniform(r, (2, 1)), "c": _uniform(r, (2, 2))}),
    ],
    "slice": [
        _with(lambda b: b.output("out", b.slice(b.input("x", (5, 7)), 1, 2, 6)), lambda r: {"x": _uniform(r, (5, 7))}),
        _with(lambda b: b.output("out", b.slice(b.input("x", (5, 7)), 0, 0, 1)), lambda r: {"x": _uniform(r, (5, 7))}),
    ],
    "less": [_binary("less"), _binary("less", (4, 5), ())],
    "equal": [
        _with(lambda b: b.output("out", b.equal(b.input("a", (6,), "int64"), b.input("b", (6,), "int64"))),
              lambda r: {"a": r.integers(0, 3, 6), "b": r.integers(0, 3, 6)}),
        _with(lambda b: b.output("out", b.equal(b.input("a", (3, 4)), b.input("b", (1, 4)))),
              lambda r: {"a": np.round(_uniform(r, (3, 4))), "b": np.round(_uniform(r, (1, 4)))}),
    ],
    "where": [
        _with(lambda b: b.output("out", b.where(b.input("c", (3, 4), "bool"), b.input("a", (3, 4)), b.input("b", (4,)))),
              lambda r: {"c": r.random((3, 4)) < 0.5, "a": _uniform(r, (3, 4)), "b": _uniform(r, (4,))}),
        _with(lambda b: b.output("out", b.where(b.less(b.input("a", (3, 4)), 0.0), b.input("b", (3, 4)), 1.5)),
              lambda r: {"a": _uniform(r, (3, 4)), "b": _uniform(r, (3, 4))}),
    ],
    "cast": [
        _with(lambda b: b.output("out", b.cast(b.input("x", (7,), "int64"), "float32")), lambda r: {"x": r.integers(-5, 5, 7)}),
        _with(lambda b: b.output("out", b.cast(b.input("x", (7,), "bool"), "float32")), lambda r: {"x": r.random(7) < 0.5}),
        _with(lambda b: b.output("out", b.cast(b.input("x", (7,)), "int64")),  # whole floats: truncation is moot
              lambda r: {"x": np.round(_uniform(r, (7,), -9, 9))}),
    ],
    "cumsum": [
        _with(lambda b: b.output("out", b.cumsum(b.input("x", (3, 6)), 1)), lambda r: {"x": _uniform(r, (3, 6))}),
        _with(lambda b: b.output("out", b.cumsum(b.input("x", (3, 6)), 0)), lambda r: {"x": _uniform(r, (3, 6))}),
    ],
    "argmax": [_with(lambda b: b.output("out", b.argmax(b.input("x", (4, 6)), 1)), _argmax_feeds),
               _with(lambda b: b.output("out", b.argmax(b.input("x", (4, 6)), 0)), lambda r: {"x": _uniform(r, (4, 6))})],
    "one_hot": [_with(lambda b: b.output("out", b.one_hot(b.input("i", (5,), "int64"), 10)), lambda r: {"i": r.integers(0, 10, 5)})],
    "constant": [_with(lambda b: b.output("out", b.add(b.constant(np.arange(6, dtype=np.float32).reshape(2, 3)), b.input("x", (3,)))),
                       lambda r: {"x": _uniform(r, (3,))})],
}

PARAMS = [pytest.param(op, i, id=f"{op}-{i}") for op in PRIMITIVES for i in range(len(CASES.get(op, [None])))]


def _check(program, feeds, **emit):
    model = to_onnx(program, **emit)
    onnx.checker.check_model(model, full_check=True)
    got = OrtProgram(model.SerializeToString(), threads=1).run(feeds)
    want = TorchProgram(program).run_numpy(feeds)
    assert_outputs_match(got, want, ATOL, RTOL)
    return model


def test_every_primitive_has_a_case():
    assert set(CASES) == set(PRIMITIVES)


@pytest.mark.parametrize("op,case", PARAMS)
def test_primitive_matches_torch(op, case):
    rng = np.random.default_rng(zlib.crc32(f"{op}/{case}".encode()))
    b = Builder(f"one_{op}")
    feeds = CASES[op][case](b, rng)
    program = b.build()
    assert op in program.op_counts()
    feeds = {v.name: np.asarray(feeds[v.name]).astype({"float32": np.float32, "int64": np.int64, "bool": np.bool_}[v.dtype])
             for v in program.inputs}
    _check(program, feeds)


def _chain_program(rows=64, cols=48):
    """An optimizer-like chain over [rows, cols] with column, row and scalar broadcasts, an outer
    product, a matmul+bias, outputs that are computed values and one that is an input."""
    b = Builder("chain")
    w, m, g = b.input("w", (rows, cols)), b.input("m", (rows, cols)), b.input("g", (rows, cols))
    col, row, lr = b.input("col", (rows, 1)), b.input("row", (1, cols)), b.input("lr", ())
    x, bias = b.input("x", (5, cols)), b.input("bias", (rows,))
    grad = b.add(b.add(g, b.matmul(col, row)), b.mul(w, 1e-3))
    m_new = b.add(b.mul(m, 0.9), b.mul(grad, 0.1))
    denom = b.add(b.sqrt(b.add(b.mul(grad, grad), 1e-3)), 1e-8)
    w_new = b.sub(w, b.mul(b.div(m_new, denom), lr))
    gate = b.where(b.less(w_new, 0.0), b.step(m_new), b.cast(b.less(grad, 0.1), "float32"))
    b.output("new.w", w_new)
    b.output("new.m", m_new)
    b.output("gate", gate)
    b.output("z", b.relu(b.add(b.matmul(x, w_new, trans_b=True), bias)))
    b.output("same_w", w)  # an input as output: keeps its copy
    b.output("again_m", m_new)  # a value under two output names
    rng = np.random.default_rng(1)
    feeds = {"w": _uniform(rng, (rows, cols)), "m": _uniform(rng, (rows, cols)), "g": _uniform(rng, (rows, cols)),
             "col": _uniform(rng, (rows, 1)), "row": _uniform(rng, (1, cols)), "lr": np.array(0.01, np.float32),
             "x": _uniform(rng, (5, cols)), "bias": _uniform(rng, (rows,))}
    return b.build(), feeds


@pytest.mark.parametrize("fuse", [False, True])
def test_rewrites_keep_results(fuse, monkeypatch):
    monkeypatch.setattr(onnx_backend, "FUSE_MIN_ELEMS", 1024)  # small shapes, same code path as 2000x2000
    monkeypatch.setattr(onnx_backend, "TILE_ELEMS", 512)
    program, feeds = _chain_program()
    model = _check(program, feeds, fuse=fuse)
    ops = [n.op_type for n in model.graph.node]
    bodies = [n for node in model.graph.node for a in node.attribute if a.type == onnx.AttributeProto.GRAPH for n in a.g.node]
    # copies remain only for the input-as-output and the second name of m_new (maybe inside the Scan)
    assert ops.count("Identity") + [n.op_type for n in bodies].count("Identity") == 2
    # bias folded in as C (with the ReLU after it too, when fused)
    assert any(n.op_type in ("Gemm", "FusedGemm") and len(n.input) == 3 for n in model.graph.node)
    if fuse:
        scans = [n for n in model.graph.node if n.op_type == "Scan"]
        assert len(scans) == 1
        body = scans[0].attribute[0].g
        assert len(body.node) >= 10  # the whole chain runs tile by tile
        # the element-wise chain's own intermediates no longer exist at full size outside the Scan
        assert not any(n.op_type in ("Mul", "Div", "Sqrt") for n in model.graph.node)
    else:
        assert "Scan" not in ops


def test_tiled_outputs_bitwise_equal_plain(monkeypatch):
    """Tiling changes where values live, not the arithmetic: outputs are bitwise identical."""
    monkeypatch.setattr(onnx_backend, "FUSE_MIN_ELEMS", 1024)
    monkeypatch.setattr(onnx_backend, "TILE_ELEMS", 512)
    program, feeds = _chain_program()
    plain = OrtProgram(to_onnx(program, fuse=False).SerializeToString(), threads=1).run(feeds)
    tiled = OrtProgram(to_onnx(program, fuse=True).SerializeToString(), threads=1).run(feeds)
    for name in plain:
        np.testing.assert_array_equal(plain[name], tiled[name], err_msg=name)


def test_bound_outputs_match_plain_run():
    program, feeds = _chain_program()
    ort_program = OrtProgram(to_onnx(program).SerializeToString(), threads=1)
    plain = ort_program.run(feeds)
    out = ort_program.output_buffers()
    del out["gate"]  # a mix of bound and onnxruntime-allocated outputs
    bound = ort_program.run(feeds, out=out)
    assert bound["new.w"] is out["new.w"]
    for name in plain:
        np.testing.assert_array_equal(plain[name], bound[name], err_msg=name)


@pytest.mark.parametrize("rows", [1, 2, 5])
@pytest.mark.parametrize("with_bias", [False, True])
def test_few_rows_times_weights_runs_weights_first(rows, with_bias, monkeypatch):
    """x @ W^T with few rows is emitted as (W @ x^T)^T (the weight streamed, not repacked)."""
    monkeypatch.setattr(onnx_backend, "SKINNY_MIN_WEIGHTS", 1)
    b = Builder("skinny")
    x, w, bias = b.input("x", (rows, 9)), b.input("w", (7, 9)), b.input("bias", (7,))
    y = b.matmul(x, w, trans_b=True)
    b.output("y", b.relu(b.add(y, bias)) if with_bias else y)
    rng = np.random.default_rng(rows)
    feeds = {"x": _uniform(rng, (rows, 9)), "w": _uniform(rng, (7, 9)), "bias": _uniform(rng, (7,))}
    program = b.build()
    if not with_bias:
        del feeds["bias"]
    model = _check(program, feeds)
    transposed = any(n.op_type == "Transpose" for n in model.graph.node)
    assert transposed == (rows >= onnx_backend.SKINNY_MIN_ROWS)


def test_ping_pong_bound_steps_match_plain_steps():
    """A training loop's pattern: read one buffer set, write the other, swap; the cached IO
    bindings must rebind exactly what changed."""
    program, feeds = _chain_program()
    ort_program = OrtProgram(to_onnx(program).SerializeToString(), threads=1)
    buffers = [ort_program.output_buffers(), ort_program.output_buffers()]
    bound_feeds, plain_feeds = dict(feeds), dict(feeds)
    for step in range(4):
        bound = ort_program.run(bound_feeds, out=buffers[step % 2])
        plain = ort_program.run(plain_feeds)
        for name in plain:
            np.testing.assert_array_equal(bound[name], plain[name], err_msg=f"step {step}: {name}")
        bound_feeds.update({"w": bound["new.w"], "m": bound["new.m"]})
        plain_feeds.update({"w": plain["new.w"], "m": plain["new.m"]})
        bound_feeds["lr"] = np.array(0.01 * (step + 2), np.float32)  # a fresh scalar each step
        plain_feeds["lr"] = bound_feeds["lr"]


def test_tiling_two_interleaved_recurrent_chains(monkeypatch):
    """A recurrent net's layers read each other's previous state through matmuls: the tiled group
    of a's damped updates must not end up reading b's group while b's reads a's (a cycle that
    full-size mnist-recurrent's infer_goodness hit)."""
    monkeypatch.setattr(onnx_backend, "FUSE_MIN_ELEMS", 1024)
    monkeypatch.setattr(onnx_backend, "TILE_ELEMS", 512)
    rows, cols = 64, 32
    b = Builder("two_chains")
    a, c = b.input("a", (rows, cols)), b.input("c", (rows, cols))
    w, v = b.input("w", (cols, cols)), b.input("v", (cols, cols))
    for _ in range(3):
        a, c = (b.add(b.mul(a, 0.3), b.mul(b.matmul(b.relu(c), v), 0.7)),
                b.add(b.mul(c, 0.3), b.mul(b.matmul(b.relu(a), w), 0.7)))
    b.output("a_out", a)
    b.output("c_out", c)
    rng = np.random.default_rng(2)
    feeds = {k: _uniform(rng, s) for k, s in (("a", (rows, cols)), ("c", (rows, cols)), ("w", (cols, cols)), ("v", (cols, cols)))}
    model = _check(b.build(), feeds, fuse=True)
    assert any(n.op_type == "Scan" for n in model.graph.node)  # still tiled where it is safe


def test_shipped_train_step_leaves_updates_in_tile_layout(monkeypatch):
    """The ONNX a bundle ships for a train step writes each updated parameter and optimizer slot
    straight from the tiled chain (no full-size copy into the program's shape first), computes
    each weight gradient tile by tile inside that chain, and never stores a layer's
    pre-activation; OrtProgram returns the outputs in the program's shapes, equal to the plain
    graph's up to fp32 rounding (the per-tile products round differently)."""
    import json
    from pathlib import Path

    from ffcompile.core.spec import load_model
    from ffcompile.lowering import build_program, init_state

    monkeypatch.setattr(onnx_backend, "FUSE_MIN_ELEMS", 4096)
    monkeypatch.setattr(onnx_backend, "TILE_ELEMS", 2048)
    monkeypatch.setattr(onnx_backend, "GRADIENT_TILE_ELEMS", 8192)
    model = load_model(Path(__file__).parents[1] / "bundle" / "tiny.toml")
    program = build_program(model, "train_step", 20)
    shipped = onnx_backend.shipped_onnx(program)
    tiled = json.loads({p.key: p.value for p in shipped.metadata_props}[onnx_backend.TILED_SHAPES_KEY])
    assert {"new.h1.weight", "new.h1.weight.m", "new.h1.weight.v"} <= set(tiled)  # h2 is below FUSE_MIN_ELEMS
    params, state = init_state(model, 0)
    rng = np.random.default_rng(0)
    feeds = {**params, **state, "x": rng.random((20, 784), dtype=np.float32),
             "y": rng.integers(0, 10, 20), "u": rng.random(20, dtype=np.float32), "lr": np.float32(1e-3),
             "step": np.float32(1)}
    ops = [n.op_type for n in shipped.graph.node]
    assert "FusedGemm" in ops
    scans = [n for n in shipped.graph.node if n.op_type == "Scan"]
    pulled = [n for n in scans if any(m.op_type == "Gemm" for m in n.attribute[0].g.node)]
    # column tiles are sliced inside the body (an axis-1 scan input would be transposed whole first)
    assert pulled and all(any(m.op_type == "Slice" for m in n.attribute[0].g.node) for n in pulled)
    assert not any(a.name == "scan_input_axes" for n in scans for a in n.attribute)
    gradient = next(n for n in program.nodes if n.op == "matmul" and n.output.shape == (32, 784))
    assert gradient.output.name not in {o for n in shipped.graph.node for o in n.output}  # never whole
    shipped_out = OrtProgram(shipped.SerializeToString(), threads=1).run(feeds)
    plain_out = OrtProgram(to_onnx(program, fuse=False).SerializeToString(), threads=1).run(feeds)
    assert_outputs_match(shipped_out, plain_out, atol=1e-6, rtol=1e-5)


def test_shipped_inference_program_keeps_plain_output_shapes():
    from pathlib import Path

    from ffcompile.core.spec import load_model
    from ffcompile.lowering import build_program

    model = load_model(Path(__file__).parents[1] / "bundle" / "tiny.toml")
    shipped = onnx_backend.shipped_onnx(build_program(model, "infer_goodness", 50))
    assert onnx_backend.TILED_SHAPES_KEY not in {p.key for p in shipped.metadata_props}


@pytest.mark.parametrize("keepdims", [False, True])
def test_sums_of_squares_run_tile_by_tile_with_the_plain_graphs_bits(keepdims, monkeypatch):
    """reduce_sum(x * x) over rows of a large x squares and sums one tile of rows at a time (the
    squares never exist whole) with the same Mul and ReduceSum as the plain graph: same bits,
    not the less precise one-accumulator ReduceSumSquare."""
    monkeypatch.setattr(onnx_backend, "FUSE_MIN_ELEMS", 4096)
    monkeypatch.setattr(onnx_backend, "TILE_ELEMS", 2048)
    b = Builder("ssq")
    x = b.input("x", (64, 2000))
    b.output("ssq", b.reduce_sum(b.mul(x, x), [1], keepdims=keepdims))
    program = b.build()
    model = to_onnx(program)
    assert [n.op_type for n in model.graph.node if n.op_type not in ("Reshape",)] == ["Scan"]
    body = [n.op_type for n in model.graph.node[1].attribute[0].g.node]
    assert body == ["Mul", "ReduceSum"]
    feeds = {"x": (np.random.default_rng(0).random((64, 2000), dtype=np.float32) * 3)}
    tiled = OrtProgram(model.SerializeToString(), threads=1).run(feeds)["ssq"]
    plain = OrtProgram(to_onnx(program, fuse=False).SerializeToString(), threads=1).run(feeds)["ssq"]
    np.testing.assert_array_equal(tiled, plain)


def test_a_gradient_whose_dz_is_tiled_elsewhere_still_builds(monkeypatch):
    """With the "sum" goodness, dz = dlogit * step(z) joins step(z) in a tiled chain of its own;
    the weight update's chain then reads dz by columns instead of making it again (a node in two
    Scans would read a value that exists in neither)."""
    import dataclasses
    from pathlib import Path

    from ffcompile.core.spec import Goodness, Normalization, load_model
    from ffcompile.lowering import build_program, init_state

    monkeypatch.setattr(onnx_backend, "FUSE_MIN_ELEMS", 1024)
    monkeypatch.setattr(onnx_backend, "TILE_ELEMS", 512)
    monkeypatch.setattr(onnx_backend, "GRADIENT_TILE_ELEMS", 8192)
    model = load_model(Path(__file__).parents[1] / "bundle" / "tiny.toml")
    model = dataclasses.replace(model, goodness=Goodness(kind="sum", threshold_per_unit=0.5),
                                normalization=Normalization(kind="l1"))
    program = build_program(model, "train_step", 20)
    shipped = onnx_backend.shipped_onnx(program)  # the full checker runs inside
    params, state = init_state(model, 0)
    rng = np.random.default_rng(1)
    feeds = {**params, **state, "x": rng.random((20, 784), dtype=np.float32), "y": rng.integers(0, 10, 20),
             "u": rng.random(20, dtype=np.float32), "lr": np.float32(1e-3), "step": np.float32(1)}
    feeds = {k: v for k, v in feeds.items() if k in {i.name for i in program.inputs}}
    got = OrtProgram(shipped.SerializeToString(), threads=1).run(feeds)
    want = OrtProgram(to_onnx(program, fuse=False).SerializeToString(), threads=1).run(feeds)
    assert_outputs_match(got, want, atol=1e-6, rtol=1e-5)
