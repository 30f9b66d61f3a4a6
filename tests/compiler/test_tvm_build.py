"""TVM backend: compile small FF train-step ONNX graphs (the product's lowering), run them, compare with onnxruntime."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
ort = pytest.importorskip("onnxruntime")

from ffcompile.compiler import tvm_build as tc  # noqa: E402
from ffcompile.compiler.onnx_emit import to_onnx  # noqa: E402
from ffcompile.core.spec import model_from_dict  # noqa: E402
from ffcompile.lowering import build_program, init_state  # noqa: E402
from ffcompile.reference.parity import random_feeds  # noqa: E402
from ffcompile.runtime import tvm as tvm_runtime  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ATOL = 1e-5


def ff_step(sizes: list[int], side: int, batch: int, seed: int):
    """(ONNX train_step, feeds) of a small dense FF net over side x side images, emitted plainly
    (one ONNX node per primitive) so TVM's own fusion and our schedule rules do the work."""
    model = model_from_dict({"name": "tvm-test", "input": {"size": side * side, "image_shape": [side, side]},
                             "layers": [{"name": f"h{i + 1}", "size": n} for i, n in enumerate(sizes)],
                             "negatives": {"kind": "random_label"}, "training": {"batch_size": batch}})
    program = build_program(model, "train_step", batch)
    params, state = init_state(model, seed)
    feeds = random_feeds(model, program.inputs, params, state, np.random.default_rng(seed))
    feeds = {k: np.asarray(v) for k, v in feeds.items()}
    return to_onnx(program, fuse=False), feeds


def _host_target():
    return {"kind": "llvm", "num-cores": 2}


def _ort_outputs(model, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in model.graph.output], sess.run(None, feeds)))


def _check(model, feeds, got):
    ref = _ort_outputs(model, feeds)
    assert list(got) == [o.name for o in model.graph.output]
    for name, r in ref.items():
        o = got[name]
        assert o.shape == r.shape, name
        assert o.dtype == r.dtype, name
        np.testing.assert_allclose(o, r, rtol=0, atol=ATOL, err_msg=name)


@pytest.fixture(scope="module")
def small_ff(tmp_path_factory):
    # 2 layers; d_in and hidden chosen so the GEMM rule (vector tiles), the packing path
    # (x @ W^T) and the fallbacks for odd sizes are all exercised
    model, feeds = ff_step([32, 32], side=7, batch=10, seed=1)
    out = tmp_path_factory.mktemp("tvm") / "ff_small.so"
    tc.compile_onnx(model, _host_target(), out)
    return model, feeds, out


def test_small_ff_matches_onnxruntime(small_ff):
    model, feeds, out = small_ff
    prog = tvm_runtime.load(out)
    assert prog.input_names == [i.name for i in model.graph.input]
    assert prog.output_names == [o.name for o in model.graph.output]
    got = prog.run(feeds)
    _check(model, feeds, got)
    # running twice gives the same answer (no state kept between calls)
    again = prog.run(feeds)
    for k in got:
        np.testing.assert_array_equal(got[k], again[k])


def test_sidecar_records_names(small_ff):
    model, _, out = small_ff
    meta = json.loads(Path(str(out) + ".json").read_text())
    assert [i["name"] for i in meta["inputs"]] == [i.name for i in model.graph.input]
    assert [o["name"] for o in meta["outputs"]] == [o.name for o in model.graph.output]
    assert "int64" in [o["dtype"] for o in meta["outputs"]]  # the wrong labels drawn in the step


def test_odd_shapes_and_stock_pipeline(tmp_path):
    # sizes that are not multiples of the vector width take the fallback paths
    model, feeds = ff_step([7], side=5, batch=10, seed=2)
    for schedule in ("hand", "none"):
        out = tmp_path / f"odd_{schedule}.so"
        tc.compile_onnx(model, _host_target(), out, schedule=schedule)
        _check(model, feeds, tvm_runtime.load(out).run(feeds))


def test_load_with_runtime_only(small_ff):
    """load() must work when only the TVM runtime library is loaded (as on the device)."""
    model, feeds, out = small_ff
    np.savez(out.parent / "feeds.npz", **feeds)
    code = (
        "import sys, numpy as np\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from ffcompile.runtime import tvm as tvm_runtime\n"
        f"p = tvm_runtime.load({str(out)!r})\n"
        f"f = dict(np.load({str(out.parent / 'feeds.npz')!r}))\n"
        "r = p.run(f)\n"
        f"np.savez({str(out.parent / 'got.npz')!r}, **r)\n"
        "try:\n    import tvm.relax\n    print('RELAX_IMPORTED')\n"
        "except Exception:\n    print('RELAX_UNAVAILABLE')\n"
    )
    env = dict(os.environ, TVM_USE_RUNTIME_LIB="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "RELAX_UNAVAILABLE" in res.stdout  # the compiler side really was absent
    got = dict(np.load(out.parent / "got.npz"))
    _check(model, feeds, {o.name: got[o.name] for o in model.graph.output})


def test_cross_compile_aarch64_object(tmp_path):
    """aarch64 cross-compilation: a shared library if the cross gcc exists, else a .tar of objects."""
    import shutil

    model, _ = ff_step([16], side=4, batch=10, seed=3)
    target = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"], "num-cores": 4}
    cc = shutil.which("aarch64-linux-gnu-gcc")
    if cc:
        out = tc.compile_onnx(model, target, tmp_path / "a64.so", cc=cc)
        head = out.read_bytes()[:20]
        assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 183  # EM_AARCH64
    else:
        out = tc.compile_onnx(model, target, tmp_path / "a64.tar")
        assert out.stat().st_size > 0


class _Registers(tc._CPUScheduler):
    """The tile chooser alone, for a CPU with ``lanes`` fp32 lanes and ``regs`` vector registers."""

    def __init__(self, lanes: int, regs: int):
        self.lanes, self.regs = lanes, regs


@pytest.mark.parametrize("lanes, regs", [(16, 32), (8, 16), (4, 32)])
@pytest.mark.parametrize("M, N, K, packed", [(100, 2000, 2000, True), (100, 2000, 784, True), (2000, 2000, 200, False),
                                             (2000, 784, 200, False), (8, 512, 500, True), (200, 2000, 2000, True)])
def test_register_tile_fits_the_registers_and_hides_fma_latency(lanes, regs, M, N, K, packed):
    MR, NR = _Registers(lanes, regs)._register_tile(M, N, K, packed)
    nv = NR // lanes
    assert NR % lanes == 0 and N % NR == 0 and M % MR == 0
    assert MR * nv + nv + 1 <= regs  # accumulators, B vectors, one broadcast
    # two FMA pipes of latency 4 need 8 independent accumulators; every shape here allows them
    assert MR * nv >= 8, (MR, NR)


def test_register_tile_streams_no_wider_panel_from_l2_than_l2_delivers():
    # a packed 200 x 112 panel outgrows L1: two rows of seven vectors then need more L2 bytes per
    # cycle than their FMAs take (measured 1.3x slower than 25 x 16 on the weight gradient)
    chooser = _Registers(16, 32)
    assert chooser._register_tile(2000, 784, 200, packed=True) == (25, 16)
    # ... while a 5 x 80 tile streaming its packed panel keeps up, with fewer loads per FMA
    assert chooser._register_tile(200, 2000, 2000, packed=True) == (5, 80)


@pytest.mark.parametrize("M, N, K, layout, packs", [
    (200, 2000, 2000, "NK", True),  # x @ W^T: always
    (2000, 2000, 200, "KN", True),  # the weight gradient: many row tiles share each panel
    (32, 2000, 200, "KN", False),   # few rows, a panel of one vector fits L1: read in place
    (32, 2000, 1100, "KN", True),   # a panel of one vector outgrows L1
    (500, 784, 16, "KN", False),    # the batch-8 weight gradient: all of B stays in L2
    (500, 784, 200, "KN", True),    # ... and at batch 100 it does not
    (2000, 200, 200, "KN", True),   # B fits in L2, but over 200 rows the tiles read packed panels faster
])
def test_b_is_packed_where_the_copy_pays(M, N, K, layout, packs):
    assert _Registers(16, 32)._packs_b(M, N, K, layout) is packs


@pytest.mark.parametrize("lanes, N, want", [(16, 2000, 16), (16, 8, 8), (16, 12, 4), (16, 10, 16), (8, 4, 4), (4, 2, 4)])
def test_fewer_columns_than_a_vector_run_on_narrower_vectors(lanes, N, want):
    # 10 columns: no narrower width divides them; the GEMM rule pads them to a whole vector
    assert _Registers(lanes, 32)._vector_lanes(N) == want


def test_register_tile_for_strided_b_keeps_its_panel_in_l1():
    # x^T dz (the weight gradient) reads B in place, rows N apart: a K x NR panel that stays in L1
    # beats a wider one streamed from L2 for every row tile
    chooser = _Registers(16, 32)
    MR, NR = chooser._register_tile(2000, 784, 200, packed=False)
    assert 200 * NR * 4 <= chooser.L1_BYTES
    assert MR * NR // 16 >= 16


@pytest.mark.parametrize("M, N, K, trans_a, trans_b", [
    (100, 160, 50, 0, 1),   # x @ W^T: packed B, K not a multiple of the vector width
    (20, 400, 64, 0, 1),    # several vectors per tile row
    (40, 80, 30, 1, 0),     # dz^T x: B read in place
    (200, 96, 30, 1, 0),    # dz^T x over many rows: B packed
    (40, 48, 1100, 1, 0),   # dz^T x over many rows: B packed (a panel of K rows would not fit L1)
    (5, 48, 17, 0, 1),      # one row tile, odd K
    (60, 8, 50, 0, 1),      # 8 columns: half-width vectors on AVX-512
    (200, 784, 16, 1, 0),   # a gradient's few rows over many: B read in place, the threads split the rows
    (200, 240, 100, 1, 0),  # B packed whole where the threads cannot split its column blocks evenly
    (500, 16, 784, 0, 1),   # W x^T of a small batch: one column block, so B packed whole, rows split
    (100, 10, 600, 0, 1),   # 10 columns (a softmax readout) padded to one vector
    (1, 500, 500, 0, 1),    # x @ W^T of one row: a row reduction, 5 rows of W side by side
    (2, 500, 500, 0, 1),    # two rows: groups of W's rows that never straddle two rows of x
    (500, 2, 500, 0, 1),    # W x^T of two rows: groups of whole output rows
    (3, 7, 64, 0, 1),       # rows side by side: all 7 of an output row
])
def test_gemm_tiles_on_the_build_hosts_cpu_match_numpy(tmp_path, M, N, K, trans_a, trans_b):
    """The widest tiles this host's vector ISA allows (mcpu as the native target resolves it)."""
    from onnx import TensorProto, helper

    from ffcompile.compiler.targets import find_target

    native = find_target("x86-cpu-tvm-native").tvm if tc.host_arch() == "x86_64" else _host_target()
    a_shape, b_shape = ([K, M] if trans_a else [M, K]), ([N, K] if trans_b else [K, N])
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["a", "b"], ["c"], transA=trans_a, transB=trans_b)], "gemm",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, a_shape),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, b_shape)],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [M, N])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    out = tmp_path / "gemm.so"
    tc.compile_onnx(model, {**native, "num-cores": 2}, out)
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(a_shape, dtype=np.float32), rng.standard_normal(b_shape, dtype=np.float32)
    got = tvm_runtime.load(out).run({"a": a, "b": b})["c"]
    want = (a.T if trans_a else a).astype(np.float64) @ (b.T if trans_b else b).astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_a_row_reduction_sums_several_rows_side_by_side():
    """A matrix-vector product's rows each sum into one vector of partial sums: rows side by side
    make independent FMAs (a single row's chain waits on each FMA's latency), in groups of whole
    output rows when an output row is shorter than a group."""
    from tvm import te

    def log(M: int, N: int, K: int) -> str:
        x, w = te.placeholder((M, K), name="x"), te.placeholder((N, K), name="w")
        k = te.reduce_axis((0, K), name="k")
        c = te.compute((M, N), lambda i, j: te.sum(x[i, k] * w[j, k], axis=k), name="c")
        scheduler = tc._CPUScheduler(te.create_prim_func([x, w, c]), tc._as_target(_host_target()))
        scheduler.reduction("c")
        return scheduler.log[-1]

    assert log(1, 500, 500) == "row-reduction c: 5 rows side by side"
    assert log(500, 2, 500) == "row-reduction c: 8 rows side by side"


@pytest.mark.parametrize("shape", [[32, 48], [24, 40], [20, 36]])  # tiles of 16, of 8, and neither
def test_transpose_tiles_match_numpy(tmp_path, shape):
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Transpose", ["a"], ["t"], perm=[1, 0]), helper.make_node("Relu", ["t"], ["c"])], "t",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, shape[::-1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    out = tc.compile_onnx(model, {"kind": "llvm", "num-cores": 2}, tmp_path / "t.so")
    a = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    np.testing.assert_array_equal(tvm_runtime.load(out).run({"a": a})["c"], np.maximum(a.T, 0))


@pytest.mark.parametrize("rows", [256, 255])  # rows the threads share evenly, and not
def test_column_sums_match_numpy(tmp_path, rows):
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["a", "axes"], ["s"], keepdims=0)], "colsum",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [rows, 96])],
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, [96])],
        [numpy_helper.from_array(np.array([0], np.int64), "axes")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    out = tc.compile_onnx(model, {"kind": "llvm", "num-cores": 2}, tmp_path / "s.so")
    a = np.random.default_rng(0).standard_normal([rows, 96], dtype=np.float32)
    np.testing.assert_allclose(tvm_runtime.load(out).run({"a": a})["s"], a.astype(np.float64).sum(0), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("cols", [32, 6])  # sources of whole vectors, and not
def test_concatenation_of_computed_sources_matches_numpy(tmp_path, cols):
    from onnx import TensorProto, helper

    names = ["a", "b", "c"]
    nodes = [helper.make_node("Sqrt", [n], [f"{n}_root"]) for n in names]
    nodes.append(helper.make_node("Concat", [f"{n}_root" for n in names], ["out"], axis=1))
    graph = helper.make_graph(nodes, "concat", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [64, cols]) for n in names],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [64, 3 * cols])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    out = tc.compile_onnx(model, {"kind": "llvm", "num-cores": 2}, tmp_path / "c.so")
    rng = np.random.default_rng(0)
    feeds = {n: rng.random([64, cols], dtype=np.float32) for n in names}
    got = tvm_runtime.load(out).run(feeds)["out"]
    np.testing.assert_allclose(got, np.sqrt(np.concatenate([feeds[n] for n in names], axis=1)), rtol=1e-6)


def test_bias_gradient_sums_the_transposed_gradient_the_weight_gradient_reads(tmp_path):
    # g = h * s (rows scaled), dW = g^T x, db = sum(g, axis 0): db is summed over g^T, so g is
    # read only by its transpose (which then joins the kernel that computes g)
    from onnx import TensorProto, helper, numpy_helper
    from tvm import relax

    vi = lambda n, s: helper.make_tensor_value_info(n, TensorProto.FLOAT, s)  # noqa: E731
    nodes = [helper.make_node("Mul", ["h", "s"], ["g"]), helper.make_node("Transpose", ["g"], ["gT"], perm=[1, 0]),
             helper.make_node("MatMul", ["gT", "x"], ["dW"]), helper.make_node("ReduceSum", ["g", "axes"], ["db"], keepdims=0)]
    graph = helper.make_graph(nodes, "grads", [vi("h", [96, 48]), vi("s", [96, 1]), vi("x", [96, 32])],
                              [vi("dW", [48, 32]), vi("db", [48])], [numpy_helper.from_array(np.array([0], np.int64), "axes")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    mod, _ = tc._import_onnx(model)
    main = tc._sums_over_transposes_pass()(mod)["main"]
    bound = {b.var: b.value for blk in main.body.blocks for b in blk.bindings}
    sums = [v for v in bound.values() if isinstance(v, relax.Call) and getattr(v.op, "name", "") == "relax.sum"]
    assert len(sums) == 1 and bound[sums[0].args[0]].op.name == "relax.permute_dims"
    out = tc.compile_onnx(model, {"kind": "llvm", "num-cores": 2}, tmp_path / "g.so")
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal(shape, dtype=np.float32) for n, shape in (("h", [96, 48]), ("s", [96, 1]), ("x", [96, 32]))}
    got = tvm_runtime.load(out).run(feeds)
    g = feeds["h"].astype(np.float64) * feeds["s"]
    np.testing.assert_allclose(got["dW"], g.T @ feeds["x"], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(got["db"], g.sum(0), rtol=1e-5, atol=1e-4)


def _update_graph(nonconvex: bool):
    """m' = 0.9 m + 0.1 g and p' = p - lr m' (p' times the sum of m' if ``nonconvex``), with the sum
    of m' also an output, computed between the two updates."""
    from onnx import TensorProto, helper, numpy_helper

    shape = [6, 40]
    vi = lambda n, s=shape: helper.make_tensor_value_info(n, TensorProto.FLOAT, s)  # noqa: E731
    const = lambda n, v: numpy_helper.from_array(np.array(v, np.float32), n)  # noqa: E731
    nodes = [helper.make_node("Mul", ["m", "beta"], ["m_old"]), helper.make_node("Mul", ["g", "one_minus_beta"], ["g_new"]),
             helper.make_node("Add", ["m_old", "g_new"], ["new_m"]),
             helper.make_node("ReduceSum", ["new_m"], ["m_sum"], keepdims=0),
             helper.make_node("Mul", ["new_m", "lr"], ["step"])]
    if nonconvex:
        nodes += [helper.make_node("Mul", ["step", "m_sum"], ["scaled"]), helper.make_node("Sub", ["p", "scaled"], ["new_p"])]
    else:
        nodes += [helper.make_node("Sub", ["p", "step"], ["new_p"])]
    graph = helper.make_graph(nodes, "update", [vi("p"), vi("m"), vi("g")], [vi("new_p"), vi("new_m"), vi("m_sum", [])],
                              [const("beta", 0.9), const("one_minus_beta", 0.1), const("lr", 0.01)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("nonconvex", [False, True])
def test_state_update_group_keeps_the_order_of_values_read_between_its_members(tmp_path, nonconvex):
    """The sum of m' is read between m' and p'. Grouped, the sum moves after the group's kernel;
    when p' also reads the sum, the group would need its own output first and is left alone."""
    model = _update_graph(nonconvex)
    log: list = []
    with tvm.target.Target("llvm"):
        mod, _ = tc._import_onnx(model)
        tvm.transform.Sequential(tc._legalize_passes(tvm.target.Target("llvm"), "hand")
                                 + [tc._hand_schedule_pass(_host_target(), log)])(mod)
    one_pass = [e for e in log if any(line.startswith("one pass") for line in e["log"])]
    assert len(one_pass) == (0 if nonconvex else 1), log
    out = tmp_path / "update.so"
    tc.compile_onnx(model, _host_target(), out)
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal((6, 40), dtype=np.float32) for n in ("p", "m", "g")}
    got = tvm_runtime.load(out).run(feeds)
    ref = _ort_outputs(model, feeds)
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], rtol=0, atol=ATOL, err_msg=name)


def test_adam_update_of_each_parameter_is_one_pass(tmp_path):
    """m', v' and the new value of every parameter come out of one loop nest that reads the old
    state once; a weight's gradient GEMM is in the same kernel."""
    from tvm import relax

    model = model_from_dict({"name": "adam-test", "input": {"size": 49, "image_shape": [7, 7]},
                             "layers": [{"name": "h1", "size": 32}, {"name": "h2", "size": 32}],
                             "optimizer": {"kind": "adam", "lr": 1e-3},
                             "negatives": {"kind": "random_label"}, "training": {"batch_size": 10}})
    onnx_model = to_onnx(build_program(model, "train_step", 10), fuse=False)
    log: list = []
    target = tvm.target.Target("llvm")
    with target:
        mod, _ = tc._import_onnx(onnx_model)
        mod = tvm.transform.Sequential(tc._legalize_passes(target, "hand")
                                       + [tc._hand_schedule_pass(_host_target(), log)])(mod)

    def fused_update(lines) -> bool:  # m', v' and the parameter (and the GEMM's tile) in one loop nest
        return any((line.startswith("one pass") and line.count(",") >= 2)
                   or (line.startswith("epilogue per tile:") and line.count(",") == 2) for line in lines)

    updates = {e["func"]: e["log"] for e in log if fused_update(e["log"])}
    calls = [b.value.args[0].name_hint for b in mod["main"].body.blocks[0].bindings
             if isinstance(b.value, relax.Call) and getattr(b.value.op, "name", "") == "relax.call_tir"]
    assert sum(c in updates for c in calls) == 4, log  # h1 and h2, weight and bias
    with_gemm = [c for c in calls if c in updates and any(line.startswith("gemm") for line in updates[c])]
    assert len(with_gemm) == 2, log  # the weights' gradients


def _run_against_onnxruntime(tmp_path, nodes, inputs, outputs, feeds, target=None):
    from onnx import helper

    graph = helper.make_graph(nodes, "g", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    out = tmp_path / "g.so"
    tc.compile_onnx(model, target or _host_target(), out)
    got, want = tvm_runtime.load(out).run(feeds), _ort_outputs(model, feeds)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=ATOL, err_msg=name)


def _gradient_and_adam(n: int):
    """An ONNX graph g = A^T X over 20 k for a [10, n] parameter, then Adam's m', v' and p' from
    g, and feeds for it."""
    from onnx import TensorProto, helper, numpy_helper

    vi = lambda name, shape: helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)  # noqa: E731
    nodes = [helper.make_node("Gemm", ["a", "x"], ["g"], transA=1),
             helper.make_node("Mul", ["m", "b1"], ["m_old"]), helper.make_node("Mul", ["g", "one_minus_b1"], ["m_new"]),
             helper.make_node("Add", ["m_old", "m_new"], ["new_m"]),
             helper.make_node("Mul", ["g", "g"], ["g2"]), helper.make_node("Mul", ["v", "b2"], ["v_old"]),
             helper.make_node("Mul", ["g2", "one_minus_b2"], ["v_new"]), helper.make_node("Add", ["v_old", "v_new"], ["new_v"]),
             helper.make_node("Sqrt", ["new_v"], ["root"]), helper.make_node("Add", ["root", "eps"], ["den"]),
             helper.make_node("Div", ["new_m", "den"], ["ratio"]), helper.make_node("Mul", ["ratio", "lr"], ["step"]),
             helper.make_node("Sub", ["p", "step"], ["new_p"])]
    consts = {"b1": 0.9, "one_minus_b1": 0.1, "b2": 0.999, "one_minus_b2": 0.001, "eps": 1e-8, "lr": 0.01}
    m, k = 10, 20
    graph_inputs = [vi("a", [k, m]), vi("x", [k, n]), vi("p", [m, n]), vi("m", [m, n]), vi("v", [m, n])]
    nodes = [helper.make_node("Constant", [], [c], value=numpy_helper.from_array(np.array(val, np.float32)))
             for c, val in consts.items()] + nodes
    rng = np.random.default_rng(0)
    feeds = {"a": rng.standard_normal((k, m), dtype=np.float32), "x": rng.standard_normal((k, n), dtype=np.float32),
             "p": rng.standard_normal((m, n), dtype=np.float32), "m": rng.standard_normal((m, n), dtype=np.float32) * 0.1,
             "v": rng.random((m, n), dtype=np.float32)}
    outputs = [vi("new_p", [m, n]), vi("new_m", [m, n]), vi("new_v", [m, n])]
    return nodes, graph_inputs, outputs, feeds


def _widest_host_target() -> dict:
    from ffcompile.compiler.targets import find_target

    target = find_target("x86-cpu-tvm-native").tvm if tc.host_arch() == "x86_64" else _host_target()
    return {**target, "num-cores": 2}


@pytest.mark.parametrize("n", [20, 22, 24, 40])
def test_gradient_gemm_and_adam_update_in_one_kernel_match_onnxruntime(tmp_path, n):
    """g = A^T X over few k, then m', v' and p' from g: one kernel, with the gradient's columns
    on narrower vectors, padded to whole vectors, or neither, on this host's widest vectors."""
    nodes, graph_inputs, outputs, feeds = _gradient_and_adam(n)
    _run_against_onnxruntime(tmp_path, nodes, graph_inputs, outputs, feeds, _widest_host_target())


@pytest.mark.parametrize("lanes", [8, 16])
def test_gradient_gemm_whose_columns_split_into_narrower_vectors_keeps_its_update_per_tile(lanes):
    """20 columns (a 2 x 500 net's 500): 4-lane vectors with the update fused per tile, not a
    zero-padded product written out and updated in a second pass."""
    from onnx import helper

    nodes, graph_inputs, outputs, _ = _gradient_and_adam(20)
    model = helper.make_model(helper.make_graph(nodes, "g", graph_inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 17)])
    target = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512" if lanes == 16 else "haswell", "num-cores": 2})
    log: list = []
    with target:
        mod, _ = tc._import_onnx(model)
        tvm.transform.Sequential(tc._legalize_passes(target, "hand") + [tc._hand_schedule_pass(target, log)])(mod)
    lines = [line for e in log for line in e["log"]]
    gemm = [line for line in lines if line.startswith("gemm")]
    assert len(gemm) == 1 and "padded" not in gemm[0] and "NR=20" in gemm[0], lines
    assert any(line.startswith("epilogue per tile:") for line in lines), lines


def test_step_outputs_run_as_soon_as_their_inputs_exist():
    """An output (a parameter's update) and the bindings only it needs move up to right after the
    last binding they share with the rest; the importer had bound them where first used, at the
    end."""
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 4), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            h1 = bb.emit(relax.op.multiply(x, x))         # layer 1
            h2 = bb.emit(relax.op.add(h1, h1))            # layer 2, from layer 1
            g1 = bb.emit(relax.op.exp(h1))                # layer 1's gradient: only its update reads it
            new1 = bb.emit_output(relax.op.subtract(x, g1))
            new2 = bb.emit_output(relax.op.subtract(x, h2))
            loss = bb.emit_output(relax.op.sum(h2))
        bb.emit_func_output(relax.Tuple([new1, new2, loss]))
    mod = bb.get()
    bindings = list(mod["main"].body.blocks[0].bindings)
    order = tc._outputs_early(bindings, mod["main"].body.body)
    assert order[:4] == [0, 2, 3, 1], order  # h1, g1, new1, then h2
    assert sorted(order) == list(range(len(bindings)))
    moved = list(tc._outputs_early_pass()(mod)["main"].body.blocks[0].bindings)
    assert all(moved[k].var.same_as(bindings[i].var) for k, i in enumerate(order))


def _planned_bytes(onnx_model, outputs_early: bool = True) -> int:
    from ffcompile.compiler.tvm_in_place import InPlacePlan, candidates

    mod, inputs = tc._import_onnx(onnx_model)
    target = tc._as_target({"kind": "llvm", "num-cores": 2})
    memory = tc.PlannedMemory()
    saved = tc._outputs_early_pass
    if not outputs_early:
        tc._outputs_early_pass = lambda: tvm.transform.module_pass(lambda m, _ctx: m, opt_level=0, name="none")
    try:
        with target:
            tc.relax_pipeline(target, "hand", None, InPlacePlan(candidates(onnx_model, inputs)), memory)(mod)
    finally:
        tc._outputs_early_pass = saved
    return memory.peak_bytes


def test_weight_gradients_are_not_held_until_the_end_of_the_step():
    """Hinton's 4 x 2000 net at batch 100: each layer's 16 MB weight gradient (summed over 200 rows,
    so not inside its update's tiles) is consumed by its update before the next layer runs; in the
    importer's order every gradient, and the storage behind it, lives to the end."""
    from ffcompile.core.spec import load_model

    model = load_model(ROOT / "models" / "mnist-supervised.toml")
    onnx_model = to_onnx(build_program(model, "train_step", 100), fuse=False)
    early, late = _planned_bytes(onnx_model), _planned_bytes(onnx_model, outputs_early=False)
    gradient = 2000 * 2000 * 4
    assert gradient <= early <= 0.6 * late, (early, late)


def test_sidecar_records_the_planned_working_memory(small_ff):
    meta = json.loads(tc.sidecar_path(small_ff[2]).read_text())
    assert meta["planned_working_bytes"] > 0
    assert tvm_runtime.load(small_ff[2]).planned_working_bytes == meta["planned_working_bytes"]


def _schedule_log(model, target=None) -> list[str]:
    """What the hand schedule did to each kernel of an ONNX graph (after our Relax rewrites)."""
    target = target or tvm.target.Target({"kind": "llvm", "num-cores": 2})
    log: list = []
    with target:
        mod, _ = tc._import_onnx(model)
        tvm.transform.Sequential(tc._pre_passes("hand") + tc._legalize_passes(target, "hand")
                                 + [tc._hand_schedule_pass(target, log)])(mod)
    return [line for e in log for line in e["log"]]


def _model(nodes, inputs, outputs, initializers=()):
    from onnx import helper

    return helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, list(initializers)),
                             opset_imports=[helper.make_opsetid("", 17)])


def _vi(name, shape):
    from onnx import TensorProto, helper

    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def test_column_sums_of_row_scaled_rows_run_down_the_rows_in_order(tmp_path):
    """sum(s * y, axis 0), s a scale per row read first (a bias gradient): a column reduction with
    the threads splitting the rows, judged by y's layout, not by the [rows, 1] scale's."""
    from onnx import helper, numpy_helper

    model = _model([helper.make_node("Mul", ["s", "y"], ["g"]), helper.make_node("ReduceSum", ["g", "axes"], ["db"], keepdims=0)],
                   [_vi("s", [256, 1]), _vi("y", [256, 96])], [_vi("db", [96])],
                   [numpy_helper.from_array(np.array([0], np.int64), "axes")])
    assert any(line.startswith("col-reduction") and "rows split between the threads" in line
               for line in _schedule_log(model)), _schedule_log(model)
    rng = np.random.default_rng(0)
    feeds = {"s": rng.standard_normal((256, 1), dtype=np.float32), "y": rng.standard_normal((256, 96), dtype=np.float32)}
    out = tc.compile_onnx(model, _host_target(), tmp_path / "db.so")
    np.testing.assert_allclose(tvm_runtime.load(out).run(feeds)["db"], (feeds["s"] * feeds["y"].astype(np.float64)).sum(0),
                               rtol=1e-5, atol=1e-4)


def test_products_with_a_concatenation_read_its_parts_and_never_write_it(tmp_path):
    """A readout over several layers: logits = concat(a, b) @ W^T and its weight gradient
    d^T @ concat(a, b). The concatenation, as large as its parts together, is never written: the
    logits sum the parts' products over W's column slices, the gradient concatenates theirs."""
    from onnx import helper
    from tvm import relax

    nodes = [helper.make_node("Concat", ["a", "b"], ["c"], axis=1), helper.make_node("Gemm", ["c", "w"], ["logits"], transB=1),
             helper.make_node("Transpose", ["d"], ["dT"], perm=[1, 0]), helper.make_node("MatMul", ["dT", "c"], ["gw"])]
    model = _model(nodes, [_vi("a", [40, 32]), _vi("b", [40, 48]), _vi("w", [10, 80]), _vi("d", [40, 10])],
                   [_vi("logits", [40, 10]), _vi("gw", [10, 80])])
    mod, _ = tc._import_onnx(model)
    main = tc._concatenated_operands_pass()(mod)["main"]
    concats = [b.value for blk in main.body.blocks for b in blk.bindings
               if isinstance(b.value, relax.Call) and getattr(b.value.op, "name", "") == "relax.concat"]
    assert [tc._shape_of(c) for c in concats] == [(10, 80)], concats  # only the gradient's
    assert not any(tc._transposed(b.value) is not None and b.value.args[0].name == "w"
                   for blk in main.body.blocks for b in blk.bindings)  # W^T: read by nothing now
    # a concatenation something else reads too stays as it is
    kept = _model(nodes + [helper.make_node("Relu", ["c"], ["r"])], model.graph.input,
                  [*model.graph.output, _vi("r", [40, 80])])
    mod, _ = tc._import_onnx(kept)
    assert tc._concatenated_operands_pass()(mod).script() == mod.script()
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal(s, dtype=np.float32) for n, s in (("a", [40, 32]), ("b", [40, 48]), ("w", [10, 80]),
                                                                     ("d", [40, 10]))}
    out = tc.compile_onnx(model, _host_target(), tmp_path / "readout.so")
    got, want = tvm_runtime.load(out).run(feeds), _ort_outputs(model, feeds)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-4, err_msg=name)


def _weight_gradient_and_momentum(rows: int, units: int, fan_in: int):
    """dz = s * y (a scale per row), the weight gradient dz^T x, the bias gradient sum(dz, axis 0),
    and SGD with momentum on the weight: m' = 0.9 m + g, w' = w - 0.01 m'."""
    from onnx import helper, numpy_helper

    consts = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("beta", 0.9), ("lr", 0.01))]
    consts.append(numpy_helper.from_array(np.array([0], np.int64), "axes"))
    nodes = [helper.make_node("Mul", ["s", "y"], ["dz"]), helper.make_node("Transpose", ["dz"], ["dzT"], perm=[1, 0]),
             helper.make_node("MatMul", ["dzT", "x"], ["g"]), helper.make_node("ReduceSum", ["dz", "axes"], ["db"], keepdims=0),
             helper.make_node("Mul", ["m", "beta"], ["m_old"]), helper.make_node("Add", ["m_old", "g"], ["new_m"]),
             helper.make_node("Mul", ["new_m", "lr"], ["step"]), helper.make_node("Sub", ["w", "step"], ["new_w"])]
    shapes = {"s": [rows, 1], "y": [rows, units], "x": [rows, fan_in], "w": [units, fan_in], "m": [units, fan_in]}
    model = _model(nodes, [_vi(n, s) for n, s in shapes.items()],
                   [_vi("new_w", [units, fan_in]), _vi("new_m", [units, fan_in]), _vi("db", [units])], consts)
    rng = np.random.default_rng(0)
    return model, {n: rng.standard_normal(s, dtype=np.float32) for n, s in shapes.items()}


def test_a_large_weight_gradient_runs_by_blocks_of_units_with_its_update(tmp_path, monkeypatch):
    """dz^T larger than UNIT_BLOCK_BYTES is never written whole: one kernel computes it a block of
    units at a time, with that block's gradient and update. The step then plans less memory than
    with dz^T, the gradient and a whole copy of x written out, and gives the same numbers."""
    rows, units, fan_in = 256, 160, 96  # dz^T: 160 KB
    model, feeds = _weight_gradient_and_momentum(rows, units, fan_in)
    whole = _planned_bytes(model)
    monkeypatch.setattr(tc._CPUScheduler, "UNIT_BLOCK_BYTES", 48 << 10)
    lines = _schedule_log(model)
    gemm = [line for line in lines if line.startswith("gemm")]
    assert len(gemm) == 1 and "A by blocks of" in gemm[0], lines
    by_blocks = _planned_bytes(model)
    assert by_blocks < 0.6 * whole, (by_blocks, whole)  # without dz^T whole, the larger of its tensors
    out = tc.compile_onnx(model, _host_target(), tmp_path / "g.so")
    got, want = tvm_runtime.load(out).run(feeds), _ort_outputs(model, feeds)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-4, err_msg=name)


def test_ff_step_with_weight_gradients_by_blocks_of_units_matches_onnxruntime(tmp_path, monkeypatch):
    monkeypatch.setattr(tc._CPUScheduler, "UNIT_BLOCK_BYTES", 16 << 10)
    model, feeds = ff_step([64, 64], side=8, batch=64, seed=2)  # dz^T of each layer: 64 x 128 rows, 32 KB
    assert any("A by blocks of" in line for line in _schedule_log(model))  # (one kernel for both layers)
    out = tc.compile_onnx(model, _host_target(), tmp_path / "step.so")
    _check(model, feeds, tvm_runtime.load(out).run(feeds))


def test_hintons_net_at_batch_1000_holds_fewer_than_three_of_its_activations_at_once():
    """4 x 2000 at batch 1000: the positive and negative pass's tensors are [2000, 2000], 16 MB.
    A layer's input and output are live while its weight gradient runs; with dz^T, the gradient
    or a whole copy of the input written out too, the step would hold three or more (half of
    backprop's working memory is less than three, see docs/performance.md)."""
    from ffcompile.core.spec import load_model

    model = load_model(ROOT / "models" / "mnist-supervised.toml")
    planned = _planned_bytes(to_onnx(build_program(model, "train_step", 1000), fuse=False))
    assert planned < 2.7 * 2000 * 2000 * 4, planned


def test_a_one_vector_wide_gemm_over_many_k_is_padded_to_the_wide_tile():
    """784 columns (49 AVX-512 vectors): over 1000 k or more, padded to 800 for a tile of whole
    double vectors; over fewer, the one-vector tile that divides 784 (no trimming copy)."""
    from onnx import helper

    target = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": 2})
    for k, padded in ((1024, True), (200, False)):
        model = _model([helper.make_node("MatMul", ["a", "b"], ["c"])], [_vi("a", [64, k]), _vi("b", [k, 784])],
                       [_vi("c", [64, 784])])
        gemm = [line for line in _schedule_log(model, target) if line.startswith("gemm")]
        assert len(gemm) == 1 and ("N=800 (padded)" in gemm[0]) == padded, gemm


def test_padded_weight_gradient_by_blocks_of_units_matches_onnxruntime(tmp_path, monkeypatch):
    """The 784-column weight gradient over 1024 rows on this host's widest vectors, by blocks of
    units with its update: padded or not, the same numbers as onnxruntime."""
    monkeypatch.setattr(tc._CPUScheduler, "UNIT_BLOCK_BYTES", 64 << 10)
    model, feeds = _weight_gradient_and_momentum(1024, 64, 784)
    target = tvm.target.Target(_widest_host_target())
    gemm = [line for line in _schedule_log(model, target) if line.startswith("gemm")]
    assert len(gemm) == 1 and "A by blocks of" in gemm[0], gemm
    if tc._cpu_params(target)["lanes"] == 16:  # 784 is 49 vectors: one-vector tile, padded
        assert "N=800 (padded)" in gemm[0], gemm
    out = tc.compile_onnx(model, _widest_host_target(), tmp_path / "g.so")
    got, want = tvm_runtime.load(out).run(feeds), _ort_outputs(model, feeds)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-4, err_msg=name)


def test_a_weight_gradient_whose_blocks_cannot_be_scheduled_writes_dz_t_whole(tmp_path, monkeypatch):
    """If scheduling by blocks of units fails, the GEMM keeps its tiles with dz^T written whole
    (said in the schedule log), rather than losing its schedule, and gives the same numbers."""
    def fail(*_args):
        raise RuntimeError("no blocks")

    monkeypatch.setattr(tc._CPUScheduler, "UNIT_BLOCK_BYTES", 48 << 10)
    monkeypatch.setattr(tc._CPUScheduler, "_by_unit_blocks", fail)
    model, feeds = _weight_gradient_and_momentum(256, 160, 96)
    gemm = [line for line in _schedule_log(model) if line.startswith("gemm ")]
    assert len(gemm) == 1 and "A written whole" in gemm[0], gemm
    out = tc.compile_onnx(model, _host_target(), tmp_path / "g.so")
    got, want = tvm_runtime.load(out).run(feeds), _ort_outputs(model, feeds)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-4, err_msg=name)
