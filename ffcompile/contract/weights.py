"""A bundle's tensors: parameters in ``weights.safetensors``, optimizer state in
``optimizer.safetensors`` (with the training position, epoch and step, in its metadata)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from ..core.spec import Model
from ..lowering.state import param_specs, state_specs
from .manifest import WEIGHTS_FORMAT, BundleError


def save_tensors(path: Path, tensors: dict[str, np.ndarray], **metadata) -> None:
    meta = {"format": WEIGHTS_FORMAT, **{k: str(v) for k, v in metadata.items()}}
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, str(path), metadata=meta)


def read_tensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    try:
        with safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise BundleError(f"{path}: not a readable safetensors file ({e})") from None
    if meta.get("format") != WEIGHTS_FORMAT:
        raise BundleError(f"{path}: not an ffcompile tensor file (metadata format {meta.get('format')!r})")
    return tensors, meta


def check_tensors(path: Path, model: Model, params: dict, state: dict) -> None:
    for what, got, want in (("parameters", params, param_specs(model)), ("optimizer state", state, state_specs(model))):
        if set(got) != set(want):
            raise BundleError(f"{path}: {what} do not match the model: missing {sorted(set(want) - set(got))}, "
                              f"unexpected {sorted(set(got) - set(want))}")
        for name, shape in want.items():
            if tuple(got[name].shape) != tuple(shape) or got[name].dtype != np.float32:
                raise BundleError(f"{path}: {name} is {got[name].dtype} {list(got[name].shape)}, "
                                  f"the model needs float32 {list(shape)}")
            bad = int((~np.isfinite(got[name])).sum())
            if bad:
                raise BundleError(f"{path}: {what} {name} has {bad} NaN/inf value(s); the weights are unusable "
                                  "(a diverged training run?)")
