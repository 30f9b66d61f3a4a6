"""Can this machine run a bundle built for a given target? (architecture, device, providers)"""

from __future__ import annotations

import platform

from ..core.errors import FFCompileError

_ARCH_ALIASES = {"amd64": "x86_64", "x86_64": "x86_64", "arm64": "aarch64", "aarch64": "aarch64",
                 "armv7l": "armv7l", "armv7": "armv7l", "riscv64": "riscv64"}


def host_arch() -> str:
    machine = platform.machine().lower()
    return _ARCH_ALIASES.get(machine, machine)


def onnxruntime_providers() -> list[str]:
    import onnxruntime

    return onnxruntime.get_available_providers()


def why_not_here(target: dict) -> str | None:
    """None if this machine can run programs built for ``target`` (a target's JSON form), else the
    reason in one line."""
    name = target.get("name", "?")
    arch = host_arch()
    if target.get("arch") != arch:
        return (f"the bundle was built for target {name!r} ({target.get('arch')}, {target.get('device')}), "
                f"but this machine is {arch}" + ("; check it here under qemu with `ffcompile verify BUNDLE --emulate`"
                                                  if target.get("arch") == "aarch64" and arch == "x86_64" else ""))
    if target.get("backend") == "onnxruntime":
        available = onnxruntime_providers()
        missing = [p for p in target.get("providers", []) if p not in available]
        if missing and "CUDAExecutionProvider" in missing:
            return (f"the bundle's target {name!r} needs onnxruntime's CUDAExecutionProvider: no GPU / CUDA execution "
                    f"provider here (onnxruntime offers {', '.join(available)}; CUDA needs an NVIDIA GPU and "
                    "onnxruntime-gpu); build with --target x86-cpu to run on this machine")
        if missing:
            return (f"the bundle's target {name!r} needs onnxruntime's {', '.join(missing)}, which this onnxruntime "
                    f"lacks (it offers {', '.join(available)})")
    if target.get("backend") == "tvm":
        try:
            import tvm
        except ImportError:
            return f"the bundle's target {name!r} needs the TVM runtime (pip install apache-tvm), which is not installed"
        if target.get("device") == "cuda" and not tvm.cuda(0).exist:
            return (f"the bundle's target {name!r} needs a CUDA GPU and a TVM runtime built with CUDA: no CUDA device "
                    "visible to TVM here; build with --target x86-cpu-tvm to run on this machine")
    return None


def check_runs_here(target: dict) -> None:
    reason = why_not_here(target)
    if reason:
        raise FFCompileError(reason)
