"""ONNX emitter: one tensor program -> one ONNX model (opset 18) that passes the full checker.

Each primitive maps to one or two standard ONNX ops; constants become initializers. Node and
value names keep the program's scopes (``posneg/h1/local_rule/...``) so graphs read well in
Netron. Imports only onnx and numpy: the on-device runtime never needs torch.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..program.ir import Node, Program

OPSET = 18
_TYPES = {"float32": TensorProto.FLOAT, "int64": TensorProto.INT64, "bool": TensorProto.BOOL}
_SIMPLE = {
    "identity": "Identity", "add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div",
    "maximum": "Max", "minimum": "Min", "neg": "Neg", "relu": "Relu", "sigmoid": "Sigmoid",
    "exp": "Exp", "log": "Log", "sqrt": "Sqrt", "abs": "Abs",
    "less": "Less", "equal": "Equal", "where": "Where",
}


class _Graph:
    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def const(self, name: str, array) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, inputs, output: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, list(inputs), [output], name=output, **attrs))
        return output


def _lower(g: _Graph, node: Node) -> None:
    out, ins, a = node.output.name, list(node.inputs), node.attrs
    op = node.op
    if op in _SIMPLE:
        g.node(_SIMPLE[op], ins, out)
    elif op == "matmul":
        g.node("Gemm", ins, out, transA=int(a["trans_a"]), transB=int(a["trans_b"]))
    elif op == "step":
        positive = g.node("Greater", [ins[0], g.const(f"{out}/zero", np.float32(0))], f"{out}/positive")
        g.node("Cast", [positive], out, to=TensorProto.FLOAT)
    elif op in ("reduce_sum", "reduce_max"):
        axes = g.const(f"{out}/axes", np.array(a["axes"], np.int64))
        g.node("ReduceSum" if op == "reduce_sum" else "ReduceMax", [ins[0], axes], out, keepdims=int(a["keepdims"]))
    elif op == "reshape":
        g.node("Reshape", [ins[0], g.const(f"{out}/shape", np.array(a["new_shape"], np.int64))], out)
    elif op == "transpose":
        g.node("Transpose", ins, out, perm=list(a["perm"]))
    elif op == "concat":
        g.node("Concat", ins, out, axis=a["axis"])
    elif op == "slice":
        g.node("Slice", [ins[0], g.const(f"{out}/starts", np.array([a["start"]], np.int64)),
                         g.const(f"{out}/ends", np.array([a["stop"]], np.int64)),
                         g.const(f"{out}/axes", np.array([a["axis"]], np.int64))], out)
    elif op == "cast":
        g.node("Cast", ins, out, to=_TYPES[a["to"]])
    elif op == "cumsum":
        g.node("CumSum", [ins[0], g.const(f"{out}/axis", np.array(a["axis"], np.int64))], out)
    elif op == "argmax":
        g.node("ArgMax", ins, out, axis=a["axis"], keepdims=0, select_last_index=0)
    elif op == "one_hot":
        column = g.node("Unsqueeze", [ins[0], g.const(f"{out}/axis", np.array([-1], np.int64))], f"{out}/column")
        hit = g.node("Equal", [column, g.const(f"{out}/classes", np.arange(a["depth"], dtype=np.int64))], f"{out}/hit")
        g.node("Cast", [hit], out, to=TensorProto.FLOAT)
    else:
        raise NotImplementedError(f"ONNX emitter: no lowering for primitive {op!r}")


def to_onnx(program: Program, doc: str = "") -> onnx.ModelProto:
    g = _Graph()
    for node in program.nodes:
        if node.op == "constant":
            g.const(node.output.name, program.constants[node.output.name])
        else:
            _lower(g, node)

    def info(v):
        return helper.make_tensor_value_info(v.name, _TYPES[v.dtype], list(v.shape))

    graph = helper.make_graph(g.nodes, program.name, [info(v) for v in program.inputs],
                              [info(v) for v in program.outputs], initializer=g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="ffcompile", doc_string=doc)
    model.ir_version = 9  # readable by onnxruntime >= 1.16 and TVM's importer
    onnx.checker.check_model(model, full_check=True)
    return model
