"""Can this machine run a bundle built for a given target? (architecture, device, providers)

Architectures have one name each, as ``uname -m`` prints it and target files spell it
(``x86_64``, ``aarch64``, ``armv7l``, ``riscv64``); a compiled library's ELF header says which
one it was built for, so a library for another CPU is refused in one line, not by ``dlopen``.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

from ..core.errors import FFCompileError

E_MACHINE = {"x86_64": 62, "aarch64": 183, "armv7l": 40, "riscv64": 243}  # ELF header e_machine
ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "armv8": "aarch64",
           "arm": "armv7l", "armhf": "armv7l", "armv7": "armv7l", "riscv": "riscv64"}
# Other e_machine values worth naming in an error message.
_OTHER_MACHINES = {3: "i386", 8: "mips", 20: "ppc", 21: "ppc64", 22: "s390", 50: "ia64", 258: "loongarch"}


def canonical_arch(arch: str) -> str:
    name = ALIASES.get(str(arch).lower(), str(arch).lower())
    if name not in E_MACHINE:
        raise FFCompileError(f"unknown architecture {arch!r}: expected one of {', '.join(E_MACHINE)}")
    return name


def host_arch() -> str:
    """The canonical name of the machine this Python runs on."""
    machine = platform.machine().lower()
    return ALIASES.get(machine, machine)


def _read_e_machine(path: Path) -> int | None:
    """e_machine of an ELF file, None when the file is not ELF."""
    try:
        with open(path, "rb") as f:
            head = f.read(20)
    except OSError as e:
        raise FFCompileError(f"cannot read {path}: {e.strerror or e}") from None
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    order = {1: "little", 2: "big"}.get(head[5])
    if order is None:
        return None
    return int.from_bytes(head[18:20], order)


def elf_machine(path: str | os.PathLike) -> str:
    """The architecture an ELF file (object, shared library, executable) was built for
    (``unknown(N)`` for an e_machine without a name)."""
    m = _read_e_machine(Path(path))
    if m is None:
        raise FFCompileError(f"{path} is not an ELF file")
    names = {v: k for k, v in E_MACHINE.items()} | _OTHER_MACHINES
    return names.get(m, f"unknown({m})")


def is_elf_for(path: str | os.PathLike, arch: str) -> bool:
    """True when ``path`` is an ELF file built for ``arch``; False for other machines and non-ELF files."""
    want = E_MACHINE[canonical_arch(arch)]
    return _read_e_machine(Path(path)) == want


def require_elf_for(path: str | os.PathLike, arch: str | None = None) -> None:
    """Refuse, with a one-line error, an ELF file that this machine (or ``arch``) cannot load."""
    want = canonical_arch(arch or host_arch())
    got = elf_machine(path)
    if got != want:
        hint = "; check it here under qemu with `ffcompile verify BUNDLE --emulate`" if (
            want == host_arch() and got == "aarch64") else ""
        raise FFCompileError(f"{path} is built for {got}, this needs {want}{hint}")


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


def peak_rss_kib() -> int:
    """The peak resident memory of this process so far, KiB (Linux's ru_maxrss)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def heap_in_use_bytes() -> int | None:
    """Bytes the C heap holds in use now (glibc's mallinfo2: small blocks plus mmapped ones):
    numpy arrays, the runtime's buffers and arenas; not code or mapped files. None where the C
    library has no mallinfo2 (not glibc, or older than 2.33)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallinfo2 = libc.mallinfo2
    except (OSError, AttributeError):
        return None

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                           "fsmblks", "uordblks", "fordblks", "keepcost")]

    mallinfo2.restype = MallInfo2
    info = mallinfo2()
    return int(info.uordblks + info.hblkhd)
