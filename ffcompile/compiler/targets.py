"""Compilation targets: ``targets/<name>.toml`` files that say which backend runs a bundle's
programs, on which device and CPU architecture, in which dtype.

Targets are looked up by name in ``$FFCOMPILE_TARGETS`` (folders separated by ``os.pathsep``) and
then in the repository's top-level ``targets/`` folder, the source of truth (in an installed wheel:
its copy, see ``ffcompile.core.shipped``); a path to a ``.toml``
file works anywhere a name does. Errors name the file and the field.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import FFCompileError
from ..core.shipped import spec_dir

ENV_VAR = "FFCOMPILE_TARGETS"
DEFAULT_DIR = spec_dir("targets")

BACKENDS = ("onnxruntime", "tvm")
DEVICES = ("cpu", "cuda")
ARCHES = ("x86_64", "aarch64", "armv7l", "riscv64")
DTYPES = ("float32",)
INFERENCE_DTYPES = ("float32", "float16", "int8")
_FIELDS = ("description", "backend", "device", "arch", "dtype", "inference_dtypes", "providers", "tvm", "cc")


class TargetError(FFCompileError):
    pass


@dataclass(frozen=True)
class Target:
    name: str
    backend: str
    device: str
    arch: str
    dtype: str = "float32"  # of the train step and the default inference programs
    inference_dtypes: tuple[str, ...] = ("float32",)  # what `build --dtype` may choose for inference
    providers: tuple[str, ...] = ()  # onnxruntime execution providers, in priority order
    tvm: dict | None = field(default=None, hash=False)  # TVM target dict (backend "tvm")
    cc: str | None = None  # cross compiler for TVM's shared library
    description: str = ""

    def to_json(self) -> dict:
        out = {"name": self.name, "backend": self.backend, "device": self.device, "arch": self.arch,
               "dtype": self.dtype, "inference_dtypes": list(self.inference_dtypes), "description": self.description}
        if self.providers:
            out["providers"] = list(self.providers)
        if self.tvm is not None:
            out["tvm"] = self.tvm
        if self.cc is not None:
            out["cc"] = self.cc
        return out


def search_dirs() -> list[Path]:
    extra = [Path(p) for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p]
    return [*extra, DEFAULT_DIR]


def load_target(path: str | Path) -> Target:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TargetError(f"{path}: target file not found") from None
    except OSError as e:
        raise TargetError(f"{path}: cannot read the target file ({e.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, ValueError) as e:
        raise TargetError(f"{path}: not valid TOML: {str(e)[:200]}") from None
    except RecursionError:
        raise TargetError(f"{path}: nested too deeply to be a target file") from None
    return target_from_dict(raw, name=path.stem, source=str(path))


def target_from_dict(raw: dict, name: str, source: str) -> Target:
    def fail(key: str, msg: str):
        raise TargetError(f"{source}: {key}: {msg}")

    for key in raw:
        if key not in _FIELDS and key != "name":
            fail(key, f"unknown field (known: {', '.join(_FIELDS)})")
    if "name" in raw and raw["name"] != name:
        fail("name", f"must match the file name {name!r} (or be left out), got {raw['name']!r}")

    def choice(key: str, choices: tuple[str, ...], default: str | None = None) -> str:
        value = raw.get(key, default)
        if value is None:
            fail(key, f"required (one of: {', '.join(choices)})")
        if value not in choices:
            fail(key, f"unknown value {value!r} (known: {', '.join(choices)})")
        return value

    backend = choice("backend", BACKENDS)
    device = choice("device", DEVICES)
    arch = choice("arch", ARCHES)
    dtype = choice("dtype", DTYPES, "float32")
    inference_dtypes = raw.get("inference_dtypes", ["float32"])
    if (not isinstance(inference_dtypes, list) or "float32" not in inference_dtypes
            or not all(d in INFERENCE_DTYPES for d in inference_dtypes)):
        fail("inference_dtypes", f"must be a list of dtypes among {', '.join(INFERENCE_DTYPES)} that includes "
                                 f"float32, got {inference_dtypes!r}")
    if backend != "onnxruntime" and inference_dtypes != ["float32"]:
        fail("inference_dtypes", "reduced-precision inference programs are built for backend \"onnxruntime\" only")
    description = raw.get("description", "")
    if not isinstance(description, str):
        fail("description", f"must be a string, got {description!r}")

    providers = raw.get("providers", [])
    if not isinstance(providers, list) or not all(isinstance(p, str) and p for p in providers):
        fail("providers", f"must be a list of onnxruntime execution provider names, got {providers!r}")
    if backend == "onnxruntime":
        if not providers:
            fail("providers", "backend \"onnxruntime\" needs at least one execution provider")
        if device == "cuda" and providers[0] != "CUDAExecutionProvider":
            fail("providers", f"device \"cuda\" needs CUDAExecutionProvider first, got {providers!r}")
        if device == "cpu" and "CUDAExecutionProvider" in providers:
            fail("providers", "device \"cpu\" cannot use CUDAExecutionProvider")
    elif providers:
        fail("providers", f"only for backend \"onnxruntime\", not {backend!r}")

    tvm = raw.get("tvm")
    if backend == "tvm":
        _check_tvm_target(tvm, device, arch, fail)
        if tvm.get("mcpu") == "native":
            tvm, description = _native_cpu(tvm, arch, description)
    elif tvm is not None:
        fail("tvm", f"only for backend \"tvm\", not {backend!r}")
    cc = raw.get("cc")
    if cc is not None and (not isinstance(cc, str) or not cc.strip()):
        fail("cc", f"must be a non-empty string (a compiler command), got {cc!r}")
    if cc is not None and backend != "tvm":
        fail("cc", f"only for backend \"tvm\" (it links TVM's shared libraries), not {backend!r}")
    if backend == "tvm" and device == "cpu" and arch != "x86_64" and cc is None:
        fail("cc", f"arch {arch!r} needs a cross compiler to link TVM's shared libraries "
                   f"(e.g. cc = \"{_TRIPLE_ARCH[arch]}-linux-gnu-gcc\")")
    return Target(name=name, backend=backend, device=device, arch=arch, dtype=dtype,
                  inference_dtypes=tuple(inference_dtypes), providers=tuple(providers),
                  tvm=tvm, cc=cc, description=description)


_TVM_KINDS = {"cpu": "llvm", "cuda": "cuda"}
_TRIPLE_ARCH = {"x86_64": "x86_64", "aarch64": "aarch64", "armv7l": "armv7", "riscv64": "riscv64"}


def _check_tvm_target(tvm, device: str, arch: str, fail) -> None:
    """The TVM target dict: its kind matches the device; a CPU target for another architecture
    than x86_64 names an LLVM triple of that architecture (``mtriple``)."""
    if not isinstance(tvm, dict):
        fail("tvm", f"backend \"tvm\" needs a TVM target dict (e.g. tvm = {{ kind = \"llvm\" }}), got {tvm!r}")
    kind = tvm.get("kind")
    if kind != _TVM_KINDS[device]:
        fail("tvm.kind", f"device {device!r} needs kind {_TVM_KINDS[device]!r}, got {kind!r}")
    triple = tvm.get("mtriple", (tvm.get("host") or {}).get("mtriple") if isinstance(tvm.get("host"), dict) else None)
    if triple is not None and not isinstance(triple, str):
        fail("tvm.mtriple", f"must be a string (an LLVM target triple), got {triple!r}")
    if triple is None and arch != "x86_64":
        fail("tvm.mtriple", f"arch {arch!r} needs an LLVM target triple, e.g. \"{_TRIPLE_ARCH[arch]}-linux-gnu\"")
    if triple is not None and not triple.startswith(_TRIPLE_ARCH[arch]):
        fail("tvm.mtriple", f"{triple!r} is not a triple for arch {arch!r} (expected {_TRIPLE_ARCH[arch]}-...)")
    mattr = tvm.get("mattr", [])
    if not isinstance(mattr, list) or not all(isinstance(a, str) for a in mattr):
        fail("tvm.mattr", f"must be a list of LLVM feature strings (e.g. [\"+neon\"]), got {mattr!r}")


def _native_cpu(tvm: dict, arch: str, description: str) -> tuple[dict, str]:
    """``mcpu = "native"``: the build host's CPU as LLVM names it, and its widest vector ISA in the
    description (which a bundle's manifest carries). Left as "native" where this host cannot build
    for it (another architecture, no TVM): listing targets still works there; building fails."""
    import platform

    host = platform.machine().lower().replace("amd64", "x86_64").replace("arm64", "aarch64")
    try:
        from tvm.target import Target as TVMTarget, codegen
    except ImportError:
        return tvm, f"{description} [needs TVM to name the build host's CPU]"
    if host != arch:
        return tvm, f"{description} [buildable only on an {arch} host; this one is {host}]"
    cpu = codegen.llvm_get_system_cpu()
    probe = TVMTarget({"kind": "llvm", "mcpu": cpu})
    isa = next((name for name, feature in (("AVX-512", "avx512f"), ("AVX2+FMA", "avx2"), ("SSE4.2", "sse4.2"))
                if codegen.llvm_cpu_has_features([feature], probe)), "baseline x86-64")
    return {**tvm, "mcpu": cpu}, f"{description} [built for {cpu}: {isa}]"


def target_files() -> dict[str, Path]:
    """Every target found, by name; an earlier search folder wins."""
    found: dict[str, Path] = {}
    for folder in search_dirs():
        if folder.is_dir():
            for path in sorted(folder.glob("*.toml")):
                found.setdefault(path.stem, path)
    return dict(sorted(found.items()))


def known_targets() -> list[Target]:
    return [load_target(path) for path in target_files().values()]


def find_target(name_or_path: str | Path | Target) -> Target:
    """A target by name (``x86-cpu``) or by path to its ``.toml``."""
    if isinstance(name_or_path, Target):
        return name_or_path
    text = str(name_or_path)
    if text.endswith(".toml") or os.sep in text:
        return load_target(Path(text))
    files = target_files()
    if text not in files:
        known = ", ".join(files) or f"none (no .toml files in {', '.join(map(str, search_dirs()))})"
        raise TargetError(f"unknown target {text!r} (known: {known}; or pass a path to a target .toml)")
    return load_target(files[text])
