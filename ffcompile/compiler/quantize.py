"""Reduced-precision inference programs: int8 (onnxruntime's static QDQ quantization) and fp16.

Input is a self-contained inference graph (``export.export_onnx``: weights as initializers, a
free batch). int8 quantizes the inputs of every matmul: weights per output channel (symmetric
int8, calibration-free), the activations feeding them per tensor (asymmetric uint8, scales from
the calibration rows' min and max). The matmul's output and everything else - the length
normalization, the squares and sums that make goodness, the softmax - stay float32, so the
goodness readout sees int8 only inside its matmuls. fp16 converts every float tensor and keeps float32 input and outputs.

``reference.fake_quant.quantization_params`` reads the scales back out of a quantized graph so
that the reference can evaluate the same quantization in float.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx

from ..contract.manifest import PROGRAMS_DIR, WEIGHT_SLICE
from ..core.errors import FFCompileError
from ..core.family import READOUT_PROGRAMS
from ..core.spec import Model
from ..data.datasets import load_model_split
from ..lowering import build_program, readouts_of
from .export import export_onnx

READOUT_OF = {program: readout for readout, program in READOUT_PROGRAMS.items()}

DTYPES = ("float32", "float16", "int8")
CALIBRATION_BATCH = 100
CALIBRATION_ROWS = 1000  # training rows whose activations set the int8 activation scales
CHECK_ROWS = 5000  # validation rows for the parity of the reduced programs and the accuracy budget
DEFAULT_BUDGET = 0.5  # percentage points of validation error a reduced dtype may add


def quantize(proto: onnx.ModelProto, dtype: str, calibration: np.ndarray | None = None) -> onnx.ModelProto:
    """``proto`` in ``dtype``; int8 needs ``calibration`` rows (float32 [N, features])."""
    if dtype == "float32":
        return proto
    if dtype == "float16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        return convert_float_to_float16(proto, keep_io_types=True)
    if dtype != "int8":
        raise FFCompileError(f"unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
    if calibration is None or len(calibration) == 0:
        raise FFCompileError("int8 quantization needs calibration rows")
    return _int8(proto, np.ascontiguousarray(calibration, np.float32))


def _int8(proto: onnx.ModelProto, rows: np.ndarray) -> onnx.ModelProto:
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class Rows(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(rows[i:i + CALIBRATION_BATCH] for i in range(0, len(rows), CALIBRATION_BATCH))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"x": batch}

    # products with a slice of a weight (a first layer's label columns, 10 inputs: export.py)
    # stay float32: nothing to gain in time, and one more rounding of their inputs
    slices = {t.name for t in proto.graph.initializer if t.doc_string.startswith(WEIGHT_SLICE)}
    slice_products = [n.name for n in proto.graph.node if n.op_type in ("MatMul", "Gemm") and slices & set(n.input)]
    quiet = logging.getLogger()
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the quantizer logs advice about models it was not given
    try:
        with tempfile.TemporaryDirectory(prefix="ffcompile-quantize-") as work:
            source, out = Path(work, "float32.onnx"), Path(work, "int8.onnx")
            onnx.save(proto, source)
            quantize_static(str(source), str(out), Rows(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            op_types_to_quantize=["MatMul", "Gemm"], nodes_to_exclude=slice_products,
                            calibrate_method=CalibrationMethod.MinMax,
                            calibration_providers=["CPUExecutionProvider"],
                            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False,
                                           # matmul outputs stay float32: one rounding less, and
                                           # onnxruntime's integer matmul then writes float directly
                                           "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"]})
            quantized = onnx.load(out)
    finally:
        quiet.setLevel(level)
    quantized.ClearField("metadata_props")
    onnx.helper.set_model_props(quantized, {p.key: p.value for p in proto.metadata_props} | {"ffcompile.dtype": "int8"})
    onnx.checker.check_model(quantized, full_check=True)
    return quantized


def program_file(name: str, dtype: str) -> str:
    return f"{PROGRAMS_DIR}/{name}.{dtype}.onnx"


def write_reduced(model: Model, params: dict, dtype: str, root: Path, data_dir, infer_batch: int,
                  source_digest: str, log=print) -> dict:
    """Every readout's inference program in ``dtype``, weights inside, written under ``root``;
    returns the manifest's ``reduced_precision`` section."""
    rows = calibration_rows(model, data_dir) if dtype == "int8" else None
    programs = {}
    for readout in readouts_of(model):
        name = READOUT_PROGRAMS[readout]
        log(f"compile {name} in {dtype}" + (f" (calibrated on {len(rows)} training rows)" if rows is not None else ""))
        proto = quantize(export_onnx(model, params, readout, source_digest), dtype, rows)
        rel = program_file(name, dtype)
        (root / rel).write_bytes(proto.SerializeToString())
        signature = build_program(model, name, infer_batch).signature()
        programs[name] = {"file": rel, "backend": "onnxruntime",
                          "inputs": [v for v in signature["inputs"] if v["name"] == "x"], "outputs": signature["outputs"]}
    return {"dtype": dtype, "weights_sha256": source_digest,
            "calibration_rows": 0 if rows is None else int(len(rows)), "programs": programs}


def calibration_rows(model: Model, data_dir) -> np.ndarray:
    """CALIBRATION_ROWS training rows (a fixed random choice), never validation or test rows."""
    _, x, _ = load_model_split(model, data_dir, "train")
    return x[np.sort(np.random.default_rng(0).choice(len(x), min(CALIBRATION_ROWS, len(x)), replace=False))]


def check_reduced_programs(model: Model, section: dict, root: Path, params: dict, data_dir, infer_batch: int,
                           budget: float, run_here: bool) -> dict:
    """Parity of the reduced programs with their reference and their accuracy cost, on up to
    CHECK_ROWS validation rows, run by this host's onnxruntime CPU provider (``run_here``: the
    target's own runtime; otherwise a host proxy of the same files)."""
    from ..reference.fake_quant import check_reduced_section
    from ..runtime.ort import OrtProgram

    source, x, y = load_model_split(model, data_dir, "val")
    x, y = x[:CHECK_ROWS], y[:CHECK_ROWS]
    runners = {name: OrtProgram((root / e["file"]).read_bytes(), ["CPUExecutionProvider"], name=e["file"])
               for name, e in section["programs"].items()}
    report = check_reduced_section(model, section, root, params, x, y, infer_batch,
                                   lambda name, _i, xb: runners[name].run({"x": xb}))
    checks = report["programs"]
    drop = max(c["error_percent"] - c["error_percent_float32"] for c in checks.values())
    return {**report, "data": f"{source.describe()}, val split, first {len(x)} rows",
            "ran_on": "this host (the target's runtime)" if run_here else "HOST PROXY: the same .onnx files in this host's onnxruntime CPU provider",
            "accuracy_budget_points": budget, "largest_drop_points": round(drop, 4), "within_budget": drop <= budget}


def budget_error(report: dict) -> str:
    worst = ", ".join(f"{READOUT_OF[name]} {c['error_percent']:.2f}% vs {c['error_percent_float32']:.2f}%"
                      for name, c in report["programs"].items())
    return (f"the {report['dtype']} programs lose {report['largest_drop_points']:.2f} points of accuracy on "
            f"{report['data']} ({worst} in float32), over the budget of {report['accuracy_budget_points']} points; "
            "raise --accuracy-budget, or pass --force to write the bundle anyway")
