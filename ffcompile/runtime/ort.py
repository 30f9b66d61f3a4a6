"""onnxruntime execution of an ONNX program (numpy in, numpy out). No torch."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from ..errors import FFCompileError


def available_providers() -> list[str]:
    return ort.get_available_providers()


class OrtProgram:
    def __init__(self, model_bytes: bytes, providers: list[str] | None = None, threads: int | None = None, name="program"):
        providers = providers or ["CPUExecutionProvider"]
        missing = [p for p in providers if p not in available_providers()]
        if missing:
            raise FFCompileError(f"onnxruntime here lacks {', '.join(missing)} (available: {', '.join(available_providers())})"
                                 + ("; no CUDA GPU/onnxruntime-gpu on this machine" if "CUDAExecutionProvider" in missing else ""))
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(model_bytes, opts, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types for invalid models
            raise FFCompileError(f"{name}: onnxruntime cannot load the model: {str(e).splitlines()[0]}") from None
        self.name = name
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {k: np.asarray(v) for k, v in feeds.items() if k in self.inputs}
        missing = set(self.inputs) - set(feeds)
        if missing:
            raise FFCompileError(f"{self.name}: missing inputs {sorted(missing)}")
        outputs = self.session.run(self.output_names, feeds)
        return dict(zip(self.output_names, outputs))
