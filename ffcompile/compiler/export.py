"""Standalone ONNX for any client: one inference program of a trained run or a bundle, with the
weights inside as initializers, a free batch dimension, and metadata that says how to feed it.

The graph is the program the bundles carry (``infer_goodness`` or ``infer_softmax``), emitted
without the row-tiling fusion so that no shape depends on the batch: the label rows are made from
the input's own rows and the one reshape over labels keeps the batch as -1. A program that still
holds a batch-sized constant (local layers with padding) is refused rather than exported with a
fixed batch.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx

from .. import __version__
from ..contract.checkpoint import CHECKPOINT, load_checkpoint
from ..contract.manifest import WEIGHT_SLICE, is_bundle_dir, read_manifest, sha256_file, verify_files
from ..contract.weights import read_tensors
from ..core.errors import FFCompileError
from ..core.family import READOUT_PROGRAMS, Family
from ..core.spec import Model, model_from_dict
from ..lowering import build_program, readouts_of
from .onnx_emit import OPSET, to_onnx

WEIGHTS = "weights.safetensors"


def load_source(path: Path) -> tuple[Model, dict[str, np.ndarray], str]:
    """(model, parameters, sha256 of the file they came from) of a run folder, a checkpoint file
    or a bundle (whose files are verified first)."""
    path = Path(path)
    if path.is_dir() and is_bundle_dir(path):
        manifest = read_manifest(path)
        verify_files(path, manifest)
        model = model_from_dict(manifest["model"], source=f"{path / 'manifest.json'} (model)")
        params, _ = read_tensors(path / WEIGHTS)
        return model, params, sha256_file(path / WEIGHTS)
    checkpoint = path / CHECKPOINT if path.is_dir() else path
    if path.suffix in (".toml", ".json"):
        raise FFCompileError(f"{path}: a model spec has no trained weights; export a run folder, a checkpoint or a bundle")
    if not checkpoint.is_file():
        raise FFCompileError(f"{path}: neither a bundle, a run folder (with {CHECKPOINT}) nor a checkpoint file")
    ckpt = load_checkpoint(checkpoint)
    return ckpt.model, ckpt.params, sha256_file(checkpoint)


def export_onnx(model: Model, params: dict[str, np.ndarray], readout: str, source_digest: str) -> onnx.ModelProto:
    """The ``readout``'s inference program as one self-contained ONNX model: input ``x`` [batch,
    features], outputs ``scores`` (goodness; or ``probs``, softmax) and ``prediction`` [batch]."""
    if model.family is not Family.FEED_FORWARD:
        raise FFCompileError(f"model {model.name!r}: export supports feed-forward models; this one is "
                             f"{model.family.value}")
    if readout not in readouts_of(model):
        raise FFCompileError(f"model {model.name!r} has no {readout} readout (it has: {', '.join(readouts_of(model))})")
    name = READOUT_PROGRAMS[readout]
    program = build_program(model, name, 1)
    if _batch_sized_constants(model, name):
        raise FFCompileError(f"model {model.name!r}: its {name} program holds constants sized by the batch "
                             "(local layers with padding), so it cannot be exported with a free batch yet")
    proto = to_onnx(program, doc=f"ffcompile {model.name}: {name}", fuse=False, weights_first=False)
    weights = {v.name for v in program.inputs if v.name != "x"}
    graph = proto.graph
    kept = [v for v in graph.input if v.name not in weights]
    del graph.input[:]
    graph.input.extend(kept)
    graph.initializer.extend(onnx.numpy_helper.from_array(np.ascontiguousarray(params[n], np.float32), n)
                             for n in sorted(weights))
    _fold_weight_slices(graph)
    for value in list(graph.input) + list(graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    del graph.value_info[:]
    onnx.helper.set_model_props(proto, metadata(model, readout, source_digest))
    onnx.checker.check_model(proto, full_check=True)
    return proto


def metadata(model: Model, readout: str, source_digest: str) -> dict[str, str]:
    label = model.input.label
    rows, cols = model.input.image_shape
    layout = (f"x: float32 [batch, {model.input.size}]: each row one image, {model.input.channels} plane(s) of "
              f"{rows}x{cols} pixels in row-major order, values in [0, 1]")
    if label.kind == "first_pixels":
        layout += f"; the first {label.classes} values are overwritten by the label (the program does it)"
    outputs = {"goodness": "scores [batch, classes]: summed goodness per label; prediction [batch]: argmax",
               "softmax": "probs [batch, classes]: softmax readout; prediction [batch]: argmax"}[readout]
    return {"ffcompile.version": __version__, "ffcompile.model": model.name, "ffcompile.readout": readout,
            "ffcompile.input_layout": layout, "ffcompile.input_range": "[0, 1]", "ffcompile.outputs": outputs,
            "ffcompile.label_embedding": json.dumps({"kind": label.kind, "classes": label.classes,
                                                     "neutral": label.neutral}),
            "ffcompile.model_ir": model.dumps(), "ffcompile.source_sha256": source_digest,
            "ffcompile.opset": str(OPSET)}


def _fold_weight_slices(graph) -> None:
    """Slices of the weights (a first layer's label columns, which the labelled passes multiply on
    their own) as initializers of their own, marked ``WEIGHT_SLICE``. Each weight is then read by
    its product alone, and int8 quantization keeps it integer inside that product: a dequantized
    weight that a Slice also reads is made in float32 on every call (measured: int8
    infer_goodness of a 2 x 500 net at one row, 0.206 ms against 0.123 ms folded)."""
    values = {t.name: t for t in graph.initializer}
    for node in list(graph.node):
        if node.op_type != "Slice" or not all(name in values for name in node.input):
            continue
        data, starts, ends, *rest = (onnx.numpy_helper.to_array(values[name]) for name in node.input)
        axes = rest[0] if rest else range(len(starts))
        steps = rest[1] if len(rest) > 1 else [1] * len(starts)
        index = [slice(None)] * data.ndim
        for axis, start, end, step in zip(axes, starts, ends, steps):
            index[int(axis)] = slice(int(start), int(end), int(step))
        folded = onnx.numpy_helper.from_array(np.ascontiguousarray(data[tuple(index)]), node.output[0])
        folded.doc_string = WEIGHT_SLICE + node.input[0]
        graph.initializer.append(folded)
        values[folded.name] = folded
        graph.node.remove(node)
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _batch_sized_constants(model: Model, name: str) -> bool:
    """Whether any constant of the program changes shape with the batch (built at 1 and 2 rows)."""
    shapes = [{n: v.shape for n, v in build_program(model, name, batch).constants.items()} for batch in (1, 2)]
    return sorted(shapes[0].values()) != sorted(shapes[1].values())
