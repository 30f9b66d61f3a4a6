"""The reference meaning of a quantized inference program: the float32 program with every
tensor the quantized graph rounds to integers rounded the same way in float ("fake
quantization"): q = clamp(round(v / scale) + zero_point, qmin, qmax), v' = (q - zero_point) *
scale, per tensor or per channel along ``axis``. The compiled int8 program computes the same
values with integer kernels; parity compares the two."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from onnx import numpy_helper

from ..core.errors import FFCompileError
from ..contract.manifest import WEIGHT_SLICE
from ..core.program import Node, Program, Value
from ..lowering import build_program
from .interpreter import TorchProgram


def quantization_params(proto) -> dict[str, dict]:
    """For every float tensor of the original graph that the quantized graph rounds to integers:
    ``{"scale", "zero_point", "axis", "qmin", "qmax", "float_readers"}``, the last being the nodes
    (named as the program values they make) that read the tensor unrounded. Activations are found at their
    QuantizeLinear nodes; weights and biases stored as integers are found at the
    DequantizeLinear nodes that read them (the float tensor they replace is named without the
    quantizer's ``_quantized`` suffix)."""
    consts = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    # readers of the unrounded tensor: nodes other than the quantizer's, and weight slices folded
    # into initializers of their own (compiler/export.py), named as the program values they were
    float_readers: dict[str, set] = {}
    for node in proto.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            for name in node.input:
                float_readers.setdefault(name, set()).add(node.name)
    for t in proto.graph.initializer:
        if t.doc_string.startswith(WEIGHT_SLICE):
            float_readers.setdefault(t.doc_string[len(WEIGHT_SLICE):], set()).add(t.name)
    params: dict[str, dict] = {}
    for node in proto.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        source = node.input[0]
        if node.op_type == "DequantizeLinear":
            if source not in consts or not source.endswith("_quantized"):
                continue  # dequantizes an activation: its QuantizeLinear said it all
            source = source[: -len("_quantized")]
        scale = consts[node.input[1]].astype(np.float32)
        zero = consts[node.input[2]] if len(node.input) > 2 and node.input[2] else np.zeros_like(scale, np.uint8)
        info = np.iinfo(zero.dtype)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        params[source] = {"scale": scale, "zero_point": zero.astype(np.int64), "axis": axis if scale.ndim else None,
                          "qmin": int(info.min), "qmax": int(info.max),
                          "float_readers": sorted(float_readers.get(source, ()))}
    return params


def fake_quantize(value: torch.Tensor, scale, zero_point, axis: int | None, qmin: int, qmax: int) -> torch.Tensor:
    scale = torch.as_tensor(scale, dtype=value.dtype)
    zero = torch.as_tensor(zero_point, dtype=value.dtype)
    if axis is not None:
        shape = [1] * value.dim()
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    q = torch.clamp(torch.round(value / scale) + zero, qmin, qmax)
    return (q - zero) * scale


def fake_quantized(program: Program, params: dict[str, dict]) -> TorchProgram:
    """``program`` with the rounding of ``params`` (``quantization_params``: value name -> scale,
    zero_point, axis, qmin, qmax) applied to those values."""
    known = {v.name for v in program.inputs} | {n.output.name for n in program.nodes}
    missing = sorted(set(params) - known)
    if missing:
        raise FFCompileError(f"{program.name}: the quantized graph rounds tensors the program does not have "
                             f"({', '.join(missing[:3])}); it was not made from this model")
    nodes, rewrite = list(program.nodes), {}
    for name, p in params.items():
        rounding = (lambda v, p=p: fake_quantize(v, p["scale"], p["zero_point"], p["axis"], p["qmin"], p["qmax"]))
        unrounded = set(p.get("float_readers", ()))
        rounded = [k for k, n in enumerate(nodes) if name in n.inputs and n.output.name not in unrounded]
        if len(rounded) == sum(name in n.inputs for n in nodes):
            rewrite[name] = rounding  # every reader reads it rounded
            continue
        if not rounded:
            continue
        # some readers read it as it is (a first layer's weight, whose label columns a slice
        # takes unrounded): a rounded copy for the others
        value = next(v for v in [*program.inputs, *(n.output for n in nodes)] if v.name == name)
        copy = Value(f"{name}/rounded", value.shape, value.dtype)
        for k in rounded:
            nodes[k] = dataclasses.replace(nodes[k], inputs=tuple(copy.name if i == name else i for i in nodes[k].inputs))
        nodes.insert(rounded[0], Node("identity", (name,), copy, {}))
        rewrite[copy.name] = rounding
    program = dataclasses.replace(program, nodes=nodes)
    return TorchProgram(program, rewrite=rewrite)


# A reduced-precision program agrees with its reference when its predictions agree on at least
# MIN_AGREEMENT of the rows and every float output is within MAX_REL_DIFF of the reference,
# relative to the largest magnitude of that output in the batch. Rounding a value that lies
# within float error of a quantization step boundary the other way moves it by one step, so
# exact equality is not expected; one step of the coarsest activation scale is ~1 % of range.
MIN_AGREEMENT = 0.995
MAX_REL_DIFF = 2e-2


def check_reduced(model, name: str, dtype: str, qparams: dict, params: dict, x: np.ndarray, y: np.ndarray,
                  compiled: Callable[[int, np.ndarray], dict], batch: int) -> dict:
    """Compare the reduced-precision program ``name`` (outputs of batch ``i`` with rows ``xb``:
    ``compiled(i, xb)``) with its reference on the rows ``x``: the fake-quantized float32 program
    for int8, the float32 program for float16. Also measures the error rates against ``y`` of the
    compiled program and of the float32 reference (the accuracy cost of ``dtype``)."""
    program = build_program(model, name, batch)
    exact = TorchProgram(program)
    reference = fake_quantized(program, qparams) if dtype == "int8" else exact
    weights = {k: torch.as_tensor(v) for k, v in params.items() if k in {v.name for v in program.inputs}}
    agree = wrong = wrong_float32 = rows = 0
    worst = 0.0
    with torch.no_grad():
        for i, (start, n, padded) in enumerate(padded_batches(x, batch)):
            feeds = {"x": torch.as_tensor(padded), **weights}
            ref = {k: v.numpy()[:n] for k, v in reference.run(feeds).items()}
            base = ref if reference is exact else {k: v.numpy()[:n] for k, v in exact.run(feeds).items()}
            got = {k: np.asarray(v)[:n] for k, v in compiled(i, padded).items()}
            for out, value in ref.items():
                if value.dtype.kind == "f":
                    scale = float(np.max(np.abs(value))) or 1.0
                    worst = max(worst, float(np.max(np.abs(got[out].astype(np.float64) - value))) / scale)
            agree += int(np.sum(got["prediction"] == ref["prediction"]))
            wrong += int(np.sum(got["prediction"] != y[start:start + n]))
            wrong_float32 += int(np.sum(base["prediction"] != y[start:start + n]))
            rows += n
    agreement = agree / max(rows, 1)
    return {"program": name, "dtype": dtype, "rows": rows,
            "reference": "fake-quantized float32 program" if dtype == "int8" else "float32 program",
            "prediction_agreement": round(agreement, 6), "max_rel_diff": worst,
            "tolerance": {"min_agreement": MIN_AGREEMENT, "max_rel_diff": MAX_REL_DIFF},
            "passed": agreement >= MIN_AGREEMENT and worst <= MAX_REL_DIFF,
            "error_percent": 100.0 * wrong / max(rows, 1), "error_percent_float32": 100.0 * wrong_float32 / max(rows, 1)}


def check_reduced_section(model, section: dict, root, params: dict, x: np.ndarray, y: np.ndarray, batch: int,
                          outputs: Callable[[str, int, np.ndarray], dict]) -> dict:
    """``check_reduced`` for every program of a bundle's ``reduced_precision`` section (files under
    ``root``); ``outputs(name, i, xb)``: the compiled program ``name``'s outputs of batch ``i``."""
    import onnx

    dtype, checks = section["dtype"], {}
    for name, entry in section["programs"].items():
        qparams = quantization_params(onnx.load(Path(root) / entry["file"])) if dtype == "int8" else {}
        checks[name] = check_reduced(model, name, dtype, qparams, params, x, y,
                                     lambda i, xb, name=name: outputs(name, i, xb), batch)
    return {"dtype": dtype, "programs": checks, "passed": all(c["passed"] for c in checks.values())}


def padded_batches(x: np.ndarray, batch: int):
    """(first row, rows, the batch padded to ``batch`` rows by repeating its last row)."""
    for start in range(0, len(x), batch):
        xb = x[start:start + batch]
        yield start, len(xb), np.concatenate([xb, np.repeat(xb[-1:], batch - len(xb), 0)]) if len(xb) < batch else xb


def reduced_lines(section: dict) -> list[str]:
    """Summary lines of a ``reduced_precision`` parity section."""
    lines = []
    for name, c in section["programs"].items():
        lines.append(f"  {name + '.' + c['dtype']:28s} {'ok  ' if c['passed'] else 'FAIL'} predictions agree with the "
                     f"{c['reference']} on {100 * c['prediction_agreement']:.2f}% of {c['rows']} rows, max rel diff "
                     f"{c['max_rel_diff']:.1e}; error {c['error_percent']:.2f}% (float32 {c['error_percent_float32']:.2f}%)")
    if "within_budget" in section:
        lines.append(f"    {section['dtype']} costs {section['largest_drop_points']:+.2f} points of validation accuracy at most "
                     f"(budget {section['accuracy_budget_points']}){'; OVER BUDGET, written with --force' if section.get('forced') else ''}")
    return lines
