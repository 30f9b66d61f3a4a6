"""TVM train steps that write the new state over the old (compiler.tvm_in_place): which updates
go in place, that they compute what onnxruntime computes, and who may have their arrays
overwritten (only a caller that donates them)."""

from __future__ import annotations

import json

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from ffcompile.compiler import tvm_build as tc  # noqa: E402
from ffcompile.compiler.onnx_emit import to_onnx  # noqa: E402
from ffcompile.core.spec import model_from_dict  # noqa: E402
from ffcompile.lowering import build_program, init_state  # noqa: E402
from ffcompile.reference.parity import random_feeds  # noqa: E402
from ffcompile.runtime import tvm as tvm_runtime  # noqa: E402
from ffcompile.runtime.finetune import CompiledTrainStep  # noqa: E402
from ffcompile.runtime.tvm import _aligned_empty  # noqa: E402

SHAPE = [8, 40]
TARGET = {"kind": "llvm", "num-cores": 2}


def _graph(nodes, extra_outputs=()):
    """Inputs w, w.m, g ([8, 40]); momentum m' = 0.9 m + 0.1 g as new.w.m; the given nodes and
    outputs on top."""
    vi = lambda n, s=SHAPE: helper.make_tensor_value_info(n, TensorProto.FLOAT, s)  # noqa: E731
    const = lambda n, v: numpy_helper.from_array(np.array(v, np.float32), n)  # noqa: E731
    nodes = [helper.make_node("Mul", ["w.m", "beta"], ["m_old"]), helper.make_node("Mul", ["g", "one_minus_beta"], ["g_new"]),
             helper.make_node("Add", ["m_old", "g_new"], ["new.w.m"]), *nodes]
    graph = helper.make_graph(nodes, "update", [vi("w"), vi("w.m"), vi("g")],
                              [vi("new.w"), vi("new.w.m"), *(vi(n) for n in extra_outputs)],
                              [const("beta", 0.9), const("one_minus_beta", 0.1), const("lr", 0.01),
                               numpy_helper.from_array(np.array([-1], np.int64), "minus_one"),
                               numpy_helper.from_array(np.array([-(2 ** 62)], np.int64), "to_start"),
                               numpy_helper.from_array(np.array([1], np.int64), "axis_1")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _feeds():
    rng = np.random.default_rng(0)
    out = {}
    for name in ("w", "w.m", "g"):
        out[name] = _aligned_empty(SHAPE, np.float32)
        out[name][...] = rng.standard_normal(SHAPE, dtype=np.float32)
    return out


def _compile(model, tmp_path):
    lib = tc.compile_onnx(model, TARGET, tmp_path / "step.so")
    return tvm_runtime.load(lib), json.loads(tvm_runtime.sidecar_path(lib).read_text())["in_place"]


def _reference(model, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in model.graph.output], sess.run(None, {k: np.array(v) for k, v in feeds.items()})))


def _donated_run_matches_reference(program, model):
    feeds = _feeds()
    want = _reference(model, feeds)
    got = program.run(feeds, donate=True)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-6, err_msg=name)


def _step_nodes():
    return [helper.make_node("Mul", ["new.w.m", "lr"], ["step"]), helper.make_node("Sub", ["w", "step"], ["new.w"])]


def test_an_update_is_written_over_the_state_only_for_a_caller_that_donates_it(tmp_path):
    model = _graph(_step_nodes())
    program, in_place = _compile(model, tmp_path)
    assert in_place == {"new.w": "w", "new.w.m": "w.m"}
    feeds = _feeds()
    before = {k: v.copy() for k, v in feeds.items()}
    want = _reference(model, feeds)
    kept = program.run(feeds)
    for name in feeds:  # without donate, the caller's arrays stay as they were
        np.testing.assert_array_equal(feeds[name], before[name], err_msg=name)
    donated = program.run(feeds, donate=True)
    for out, name in in_place.items():
        np.testing.assert_allclose(kept[out], want[out], rtol=0, atol=1e-6, err_msg=out)
        np.testing.assert_array_equal(donated[out], kept[out], err_msg=out)
        assert donated[out] is feeds[name], out  # the new value now lives in the input's array
    np.testing.assert_array_equal(feeds["g"], before["g"])  # an input nothing writes over: untouched
    # fed back, the same arrays are updated again (the program reuses its wrapping of them)
    again = program.run({**feeds, **{name: donated[out] for out, name in in_place.items()}}, donate=True)
    want_again = _reference(model, {**feeds, **{name: kept[out] for out, name in in_place.items()}})
    for out in in_place:
        np.testing.assert_allclose(again[out], want_again[out], rtol=0, atol=1e-6, err_msg=out)


def test_an_input_array_fed_again_is_read_as_it_is_now(tmp_path):
    # the program keeps its wrapping of an array fed without a copy; the caller may have written
    # into the array since
    model = _graph(_step_nodes())
    program, _ = _compile(model, tmp_path)
    feeds = _feeds()
    program.run(feeds)
    feeds["g"][...] = 3.0
    got = program.run(feeds)
    np.testing.assert_allclose(got["new.w.m"], _reference(model, feeds)["new.w.m"], rtol=0, atol=1e-6)


def test_an_old_value_read_after_its_update_keeps_its_own_buffer(tmp_path):
    # "change" = new.w - w needs the old w after new.w is computed
    model = _graph([*_step_nodes(), helper.make_node("Sub", ["new.w", "w"], ["change"])], ["change"])
    program, in_place = _compile(model, tmp_path)
    assert "new.w" not in in_place and in_place == {"new.w.m": "w.m"}
    _donated_run_matches_reference(program, model)


def test_an_old_value_read_through_a_view_after_its_update_keeps_its_own_buffer(tmp_path):
    # the old w reshaped to [40, 8] (a view of its buffer, as a GEMM operand) is read after new.w
    # is computed
    rows, cols = SHAPE[1], SHAPE[0]
    nodes = [*_step_nodes(), helper.make_node("Reshape", ["w", "as_40x8"], ["w_view"]),
             helper.make_node("MatMul", ["w_view", "ones_8x4"], ["sums"])]
    model = _graph(nodes)
    model.graph.initializer.extend([numpy_helper.from_array(np.array([rows, cols], np.int64), "as_40x8"),
                                    numpy_helper.from_array(np.ones((cols, 4), np.float32), "ones_8x4")])
    model.graph.output.append(helper.make_tensor_value_info("sums", TensorProto.FLOAT, [rows, 4]))
    program, in_place = _compile(model, tmp_path)
    assert "new.w" not in in_place
    _donated_run_matches_reference(program, model)


def test_an_update_that_reads_the_old_value_elsewhere_than_it_writes_keeps_its_own_buffer(tmp_path):
    # new.w = w + w with its columns reversed: the kernel reads w[i, 39 - j] when it writes w[i, j]
    nodes = [helper.make_node("Slice", ["w", "minus_one", "to_start", "axis_1", "minus_one"], ["flipped"]),
             helper.make_node("Add", ["w", "flipped"], ["new.w"])]
    model = _graph(nodes)
    program, in_place = _compile(model, tmp_path)
    assert "new.w" not in in_place
    _donated_run_matches_reference(program, model)


def _tiny_adam_step(tmp_path):
    model = model_from_dict({"name": "in-place-test", "input": {"size": 49, "image_shape": [7, 7]},
                             "layers": [{"name": "h1", "size": 32}, {"name": "h2", "size": 48}],
                             "optimizer": {"kind": "adam", "lr": 1e-3}, "regularizers": {"weight_decay": 1e-3},
                             "negatives": {"kind": "random_label"}, "training": {"batch_size": 10}})
    program = build_program(model, "train_step", 10)
    lib = tc.compile_onnx(to_onnx(program, fuse=False), TARGET, tmp_path / "train_step.so")
    params, state = init_state(model, 1)
    feeds = {k: np.asarray(v) for k, v in random_feeds(model, program.inputs, params, state,
                                                          np.random.default_rng(1)).items()}
    return model, program, tvm_runtime.load(lib), params, state, feeds


def test_a_train_step_updates_every_parameter_and_its_adam_state_in_place(tmp_path):
    """Adam with weight decay: the update reads the old weight in the blocks of m' and v' too, all
    computed tile by tile with the weight gradient's GEMM."""
    _, program, compiled, params, state, feeds = _tiny_adam_step(tmp_path)
    for name in ("h1.weight", "h2.weight", "h1.bias", "h2.bias"):  # (a bias is also read through a view)
        for suffix in ("", ".m", ".v"):
            assert compiled.in_place.get(f"new.{name}{suffix}") == f"{name}{suffix}"
    want = _reference(to_onnx(program, fuse=False), feeds)
    got = compiled.run(feeds)
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-5, err_msg=name)


def test_the_training_loop_donates_only_the_state_its_last_step_returned(tmp_path):
    _, program, compiled, params, state, feeds = _tiny_adam_step(tmp_path)
    carried = [*params, *state]
    step = CompiledTrainStep(compiled, {"inputs": [{"name": v.name} for v in program.inputs]}, carried)
    start = {k: _aligned_empty(np.shape(feeds[k]), np.float32) for k in carried}
    for k in carried:
        start[k][...] = feeds[k]
    kept = {k: v.copy() for k, v in start.items()}
    batch = {k: v for k, v in feeds.items() if k not in carried}
    p1, s1, _ = step({k: start[k] for k in params}, {k: start[k] for k in state}, batch)
    for k in carried:  # the caller's own arrays (a bundle's weights): never written
        np.testing.assert_array_equal(start[k], kept[k], err_msg=k)
    first = {**p1, **s1}
    first_values = {k: v.copy() for k, v in first.items()}
    p2, s2, _ = step(p1, s1, batch)
    second = {**p2, **s2}
    for out, name in compiled.in_place.items():  # the loop's own state: overwritten by the next step
        assert np.shares_memory(second[name], first[name]), name
    plain = compiled.run({**first_values, **batch})  # the same step on copies
    for k in carried:
        np.testing.assert_array_equal(second[k], plain[f"new.{k}"], err_msg=k)
