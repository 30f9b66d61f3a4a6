"""The shape of a manifest's JSON: what the runtime reads from it is checked here once, so a
malformed manifest is one line naming the field, never a KeyError or TypeError later."""

from __future__ import annotations

import re

from ..core.errors import FFCompileError
from .confine import is_plain_name

REQUIRED_KEYS = ("format", "format_version", "model", "target", "programs", "batch", "files")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,127}")
_DTYPES = ("float32", "int64", "bool")
REDUCED_DTYPES = ("float16", "int8")
MAX_BATCH = 1 << 20
MAX_DIM = 1 << 31


class ManifestError(FFCompileError):
    pass


def _need(cond: bool, where: str, field: str, what: str) -> None:
    if not cond:
        raise ManifestError(f"{where}: {field}: {what}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_values(values, where: str, field: str) -> None:
    _need(isinstance(values, list) and len(values) <= 4096, where, field, "must be a list of tensor signatures")
    for i, v in enumerate(values):
        f = f"{field}[{i}]"
        _need(isinstance(v, dict), where, f, "must be an object")
        _need(isinstance(v.get("name"), str) and _IDENT.fullmatch(v["name"]) is not None, where, f"{f}.name",
              "must be a tensor name")
        _need(v.get("dtype") in _DTYPES, where, f"{f}.dtype", f"must be one of {', '.join(_DTYPES)}")
        shape = v.get("shape")
        _need(isinstance(shape, list) and len(shape) <= 8 and all(_is_int(d) and 0 <= d < MAX_DIM for d in shape),
              where, f"{f}.shape", "must be a list of at most 8 non-negative integers")


def check_structure(manifest: dict, where: str) -> None:
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ManifestError(f"{where}: manifest lacks {', '.join(missing)}")
    files = manifest["files"]
    _need(isinstance(files, dict), where, "files", "must map relative paths to sha256 digests")
    for rel, digest in files.items():
        _need(is_plain_name(rel), where, f"files[{rel[:80]!r}]",
              "is not a plain relative path inside the bundle (no absolute paths, '..', backslashes or hidden names)")
        _need(isinstance(digest, str) and _SHA256.fullmatch(digest) is not None, where, f"files[{rel!r}]",
              "must be a sha256 digest (64 lowercase hex digits)")
    target = manifest["target"]
    _need(isinstance(target, dict), where, "target", "must be an object")
    for key in ("name", "backend", "device", "arch"):
        _need(isinstance(target.get(key), str), where, f"target.{key}", "must be a string")
    providers = target.get("providers", [])
    _need(isinstance(providers, list) and all(isinstance(p, str) for p in providers)
          and (providers or target["backend"] != "onnxruntime"), where, "target.providers",
          "must be a list of onnxruntime execution provider names (at least one for onnxruntime)")
    _need(isinstance(target.get("tvm", {}), dict), where, "target.tvm", "must be an object")
    _need(isinstance(manifest["model"], dict), where, "model", "must be an object")
    batch = manifest["batch"]
    _need(isinstance(batch, dict), where, "batch", "must be an object")
    for key in ("train", "infer"):
        _need(_is_int(batch.get(key)) and 0 < batch[key] <= MAX_BATCH, where, f"batch.{key}",
              f"must be an integer in 1..{MAX_BATCH}")
    _check_programs(manifest["programs"], files, where, "programs")
    reduced = manifest.get("reduced_precision")
    if reduced is not None:
        _need(isinstance(reduced, dict), where, "reduced_precision", "must be an object")
        _need(target["backend"] == "onnxruntime", where, "reduced_precision",
              f"reduced-precision programs run on onnxruntime, not on backend {target['backend'][:40]!r}")
        _need(reduced.get("dtype") in REDUCED_DTYPES, where, "reduced_precision.dtype",
              f"must be one of {', '.join(REDUCED_DTYPES)}")
        _need(isinstance(reduced.get("weights_sha256"), str) and _SHA256.fullmatch(reduced["weights_sha256"]) is not None,
              where, "reduced_precision.weights_sha256", "must be a sha256 digest")
        budget = reduced.get("accuracy_budget_points")
        _need(isinstance(budget, (int, float)) and not isinstance(budget, bool) and budget >= 0, where,
              "reduced_precision.accuracy_budget_points", "must be a number >= 0")
        _check_programs(reduced.get("programs"), files, where, "reduced_precision.programs")
        for name in reduced["programs"]:
            _need(name in manifest["programs"], where, f"reduced_precision.programs.{name[:80]}",
                  "names no program of the bundle")


def _check_programs(programs, files: dict, where: str, key: str) -> None:
    _need(isinstance(programs, dict) and programs, where, key, "must be a non-empty object")
    for name, entry in programs.items():
        field = f"{key}.{name[:80]}"
        _need(_IDENT.fullmatch(name) is not None, where, field, "is not a program name")
        _need(isinstance(entry, dict), where, field, "must be an object")
        rel = entry.get("file")
        _need(is_plain_name(rel), where, f"{field}.file",
              f"{str(rel)[:120]!r} is not a plain relative path inside the bundle "
              "(no absolute paths, '..', backslashes or hidden names)")
        _need(rel in files, where, f"{field}.file", f"{rel!r} is not among the bundle's hashed files")
        _check_values(entry.get("inputs"), where, f"{field}.inputs")
        _check_values(entry.get("outputs"), where, f"{field}.outputs")
