"""Run aarch64 artifacts (onnxruntime models, TVM ``.so`` libraries) on an x86 host under qemu-user.

The pieces:

* :func:`check_host_tools` / :func:`cross_compiler` -- the host programs we need, with errors that name
  the Debian package to install.
* :func:`ensure_sysroot` -- builds (once, cached) an aarch64 sysroot: Debian's arm64 ``python3.X``
  unpacked from ``.deb`` files fetched through a *private* apt state (the host's dpkg database is never
  read or written), aarch64 wheels (numpy, onnxruntime, apache-tvm, ...) pinned to the versions installed
  on the host, and an ARM ``/proc/cpuinfo`` that onnxruntime reads at import.
* :class:`Sysroot` -- runs a Python script inside that sysroot with ``qemu-aarch64 -L ROOT``.

binfmt_misc is not assumed: every aarch64 program is started explicitly through qemu.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from ..core.errors import FFCompileError
from ..runtime.machine import canonical_arch, elf_machine, is_elf_for

__all__ = [
    "EmulationError",
    "Sysroot",
    "AptSource",
    "check_host_tools",
    "cross_compiler",
    "ensure_sysroot",
    "default_cache_dir",
    "host_apt_sources",
    "DEVICE_WHEELS",
]


class EmulationError(FFCompileError):
    """Something needed to run code under emulation is missing or failed. The message is one line.

    Failures of a command carry its details: ``returncode``, ``stdout`` and ``stderr`` (may be None).
    """

    def __init__(self, message: str, *, returncode: int | None = None,
                 stdout: str | None = None, stderr: str | None = None):
        super().__init__(" ".join(str(message).split("\n")))
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr


# --------------------------------------------------------------------------------------------------
# Architectures
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Arch:
    name: str            # canonical name (ffcompile.runtime.machine)
    debian: str          # Debian architecture
    triplet: str         # GNU triplet of the cross toolchain
    qemu: str            # qemu-user program
    wheel: str           # wheel platform tag suffix
    cpuinfo: str | None  # fake /proc/cpuinfo block, "{n}" = processor number


_CORTEX_A72_CPUINFO = (
    "processor\t: {n}\n"
    "BogoMIPS\t: 108.00\n"
    "Features\t: fp asimd evtstrm crc32 cpuid\n"
    "CPU implementer\t: 0x41\n"
    "CPU architecture: 8\n"
    "CPU variant\t: 0x0\n"
    "CPU part\t: 0xd08\n"
    "CPU revision\t: 3\n"
    "\n"
)

_ARCHES = {
    "aarch64": _Arch("aarch64", "arm64", "aarch64-linux-gnu", "qemu-aarch64", "aarch64", _CORTEX_A72_CPUINFO),
    "x86_64": _Arch("x86_64", "amd64", "x86_64-linux-gnu", "qemu-x86_64", "x86_64", None),
    "armv7l": _Arch("armv7l", "armhf", "arm-linux-gnueabihf", "qemu-arm", "armv7l", None),
    "riscv64": _Arch("riscv64", "riscv64", "riscv64-linux-gnu", "qemu-riscv64", "riscv64", None),
}

# Where the host programs come from on Debian.
_TOOL_PACKAGES = {
    "gcc": "gcc",
    "qemu-aarch64": "qemu-user",
    "aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu",
    "aarch64-linux-gnu-g++": "g++-aarch64-linux-gnu",
    "apt-get": "apt",
    "dpkg-deb": "dpkg",
}


def _arch(arch: str) -> _Arch:
    return _ARCHES[canonical_arch(arch)]


def _emulated_arch(arch: str) -> _Arch:
    a = _arch(arch)
    if a.name != "aarch64":
        raise EmulationError(f"emulation is only set up for aarch64, not {a.name}")
    return a


# --------------------------------------------------------------------------------------------------
# Host tools
# --------------------------------------------------------------------------------------------------

def _missing_tool(program: str) -> EmulationError:
    pkg = _TOOL_PACKAGES.get(program)
    if pkg:
        return EmulationError(f"{program} not found: install the Debian package {pkg} "
                              f"(apt-get install {pkg})")
    return EmulationError(f"{program} not found on PATH")


def _which(program: str) -> str:
    found = shutil.which(program)
    if not found:
        raise _missing_tool(program)
    return found


def check_host_tools(arch: str = "aarch64") -> None:
    """Raise :class:`EmulationError` naming the first missing host program and its Debian package."""
    a = _emulated_arch(arch)
    for program in (a.qemu, f"{a.triplet}-gcc"):
        _which(program)


def cross_compiler(arch: str = "aarch64") -> str:
    """Path of the C cross compiler for ``arch`` (``aarch64-linux-gnu-gcc``)."""
    return _which(f"{_emulated_arch(arch).triplet}-gcc")


def qemu_program(arch: str = "aarch64") -> str:
    """Path of the qemu-user program for ``arch``."""
    return _which(_emulated_arch(arch).qemu)


# --------------------------------------------------------------------------------------------------
# The host's apt sources
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class AptSource:
    uri: str
    suites: list[str]
    components: list[str]
    signed_by: str | None = None        # a keyring path, or an inline ASCII-armored key
    architectures: list[str] | None = None
    origin: str = ""                    # file it came from

    @property
    def is_debian(self) -> bool:
        """Looks like a Debian archive (the only kind that carries the arm64 packages we need)."""
        if self.signed_by and "\n" not in self.signed_by and "debian" not in self.signed_by:
            return False
        path = self.uri.split("://", 1)[-1]
        return bool(re.search(r"/debian(-security|-ports)?/?$", path)) or "/debian/" in path + "/"


def _parse_one_line(text: str, origin: str) -> list[AptSource]:
    out = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.match(r"^(deb|deb-src)\s+(?:\[([^\]]*)\]\s+)?(\S+)\s+(\S+)\s*(.*)$", line)
        if not m or m.group(1) != "deb":
            continue
        opts = {}
        for item in (m.group(2) or "").split():
            if "=" in item:
                k, v = item.split("=", 1)
                opts[k.strip().lower().rstrip("+-")] = v.strip()
        archs = opts.get("arch")
        out.append(AptSource(uri=m.group(3), suites=[m.group(4)], components=m.group(5).split(),
                             signed_by=opts.get("signed-by"),
                             architectures=archs.split(",") if archs else None, origin=origin))
    return out


def _parse_deb822(text: str, origin: str) -> list[AptSource]:
    out = []
    paragraphs: list[dict[str, str]] = []
    cur: dict[str, str] = {}
    last = None
    for raw in text.splitlines() + [""]:
        if raw.startswith("#"):
            continue
        if not raw.strip():
            if cur:
                paragraphs.append(cur)
            cur, last = {}, None
            continue
        if raw[0] in " \t" and last:
            cont = raw.strip()
            cur[last] += "\n" + ("" if cont == "." else cont)
            continue
        if ":" in raw:
            k, v = raw.split(":", 1)
            last = k.strip().lower()
            cur[last] = v.strip()
    for p in paragraphs:
        if "deb" not in p.get("types", "").split():
            continue
        if p.get("enabled", "yes").strip().lower() in ("no", "false", "0"):
            continue
        archs = p.get("architectures")
        for uri in p.get("uris", "").split():
            out.append(AptSource(uri=uri, suites=p.get("suites", "").split(),
                                 components=p.get("components", "").split(),
                                 signed_by=(p.get("signed-by") or "").strip() or None,
                                 architectures=archs.split() if archs else None, origin=origin))
    return out


def host_apt_sources(etc: str | os.PathLike = "/etc/apt") -> list[AptSource]:
    """All enabled binary (``deb``) sources the host's apt reads: ``sources.list`` and
    ``sources.list.d/*.list`` (one-line format) and ``sources.list.d/*.sources`` (deb822)."""
    etc = Path(etc)
    files = [etc / "sources.list"]
    d = etc / "sources.list.d"
    if d.is_dir():
        files += sorted(p for p in d.iterdir() if p.suffix in (".list", ".sources"))
    out: list[AptSource] = []
    for f in files:
        try:
            text = f.read_text(errors="replace")
        except OSError:
            continue
        out += (_parse_deb822 if f.suffix == ".sources" else _parse_one_line)(text, str(f))
    return out


def _sources_for(arch: _Arch, etc: str | os.PathLike = "/etc/apt") -> list[AptSource]:
    override = os.environ.get("FFCOMPILE_APT_SOURCES")
    if override:
        p = Path(override)
        text = p.read_text() if p.is_file() else ""
        srcs = (_parse_deb822 if p.suffix == ".sources" else _parse_one_line)(text, str(p))
        if not srcs:
            raise EmulationError(f"FFCOMPILE_APT_SOURCES={override} holds no 'deb' source")
        return srcs
    keep = []
    for s in host_apt_sources(etc):
        if s.architectures and arch.debian not in s.architectures:
            continue
        if not s.uri.startswith(("http://", "https://", "file:/", "ftp://")) or not s.is_debian:
            continue
        if "main" not in s.components or not s.suites:
            continue
        keep.append(s)
    if not keep:
        raise EmulationError(f"no Debian mirror found in {etc}/sources.list or sources.list.d: "
                             "set FFCOMPILE_APT_SOURCES to a sources.list file with one")
    return keep


# --------------------------------------------------------------------------------------------------
# Sysroot
# --------------------------------------------------------------------------------------------------

# Wheels installed into the sysroot. With TVM_USE_RUNTIME_LIB=1 these are enough for
# ``import numpy, onnxruntime, tvm`` and for every module the torch-free ``ffcompile.runtime`` imports.
DEVICE_WHEELS = (
    "numpy",
    "onnxruntime",
    "apache-tvm",
    "apache-tvm-ffi",
    "ml_dtypes",
    "protobuf",
    "flatbuffers",
    "packaging",
    "typing_extensions",
    "safetensors",  # ffcompile.runtime: weights and checkpoints
    "tqdm",  # ffcompile.runtime: progress of evaluation and fine-tuning
)
# Pins that hold even when the host does not have the package.
_FIXED_PINS = {"apache-tvm-ffi": "0.1.14.post1"}
# Files removed from the installed wheels: the device only loads TVM's runtime library
# (TVM_USE_RUNTIME_LIB=1; without it tvm falls back to runtime-only when the compiler library is
# absent). libtvm_compiler.so alone is ~230 MB of the ~440 MB of wheels.
_PRUNE = ("tvm/lib/libtvm_compiler.so",)
# Debian packages unpacked into the sysroot (their dependencies come along).
_DEBIAN_PACKAGES = ("python{py}", "libstdc++6", "libgomp1")
# Bump when the layout or recipe changes, so old caches are rebuilt.
_FORMAT = 1
_MARKER = "COMPLETE.json"
_STAGE_MARKER = ".ffcompile-stage.json"


def default_cache_dir(arch: str = "aarch64") -> Path:
    """``$FFCOMPILE_CACHE/sysroot-ARCH``, else ``$XDG_CACHE_HOME/ffcompile/sysroot-ARCH``, else
    ``~/.cache/ffcompile/sysroot-ARCH``."""
    name = f"sysroot-{_arch(arch).name}"
    if os.environ.get("FFCOMPILE_CACHE"):
        return Path(os.environ["FFCOMPILE_CACHE"]).expanduser() / name
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "ffcompile" / name


# Host variables that must not reach the emulated program: they name x86 libraries, the host's
# Python installation or x86 CPU tuning.
_DROP_ENV = ("PYTHONHOME", "PYTHONPATH", "PYTHONSTARTUP", "PYTHONUSERBASE", "PYTHONEXECUTABLE",
             "VIRTUAL_ENV", "CONDA_PREFIX", "LD_LIBRARY_PATH", "LD_PRELOAD", "QEMU_LD_PREFIX",
             "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "TVM_LIBRARY_PATH", "TVM_HOME")


@dataclasses.dataclass
class Sysroot:
    """An aarch64 root filesystem with Python and the device wheels, run through qemu-user."""

    root: Path
    site: Path
    python: Path
    arch: str = "aarch64"
    info: dict = dataclasses.field(default_factory=dict, repr=False)

    def guest_env(self, env: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment an emulated program gets: the host's, less host-Python/x86 settings, plus
        ``PYTHONPATH=site`` (then any PYTHONPATH in ``env``), ``TVM_USE_RUNTIME_LIB=1``,
        ``PYTHONNOUSERSITE=1``; then ``env`` overrides the rest."""
        out = {k: v for k, v in os.environ.items() if k not in _DROP_ENV}
        out["TVM_USE_RUNTIME_LIB"] = "1"
        out["PYTHONNOUSERSITE"] = "1"
        extra = dict(env or {})
        paths = [str(self.site)]
        if extra.get("PYTHONPATH"):
            paths += [p for p in str(extra.pop("PYTHONPATH")).split(os.pathsep) if p]
        extra.pop("PYTHONPATH", None)
        out["PYTHONPATH"] = os.pathsep.join(paths)
        out.update({k: str(v) for k, v in extra.items()})
        return out

    def command(self, argv: Sequence[str | os.PathLike], qemu_args: Sequence[str] = ()) -> list[str]:
        """The host command line that runs aarch64 ``argv`` (argv[0] a path in or outside root);
        ``qemu_args``: options for qemu itself (e.g. ``-plugin``)."""
        return [qemu_program(self.arch), *qemu_args, "-L", str(self.root), *map(str, argv)]

    def run(self, argv: Sequence[str | os.PathLike], env: Mapping[str, str] | None = None,
            timeout: float | None = None, cwd: str | os.PathLike | None = None,
            check: bool = True, input: str | None = None, echo=None,
            qemu_args: Sequence[str] = ()) -> subprocess.CompletedProcess:
        """Run an aarch64 program under qemu with this sysroot; output is captured as text.
        With ``check`` a non-zero exit raises :class:`EmulationError` with the last stderr lines.
        ``echo(line)``: sees each output line as it arrives (stdout and stderr together, always
        checked, no ``input``). ``qemu_args``: options for qemu itself (e.g. ``-plugin``)."""
        cmd = self.command(argv, qemu_args)
        what = Path(str(argv[0])).name
        if echo is not None:
            out = _run_host(cmd, f"{what} under {Path(cmd[0]).name}", self.guest_env(env), echo, cwd, timeout)
            return subprocess.CompletedProcess(cmd, 0, out, "")
        try:
            proc = subprocess.run(cmd, env=self.guest_env(env), cwd=cwd, input=input,
                                  capture_output=True, text=True, errors="replace", timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise EmulationError(f"{what} under {Path(cmd[0]).name} timed out after {timeout:g} s",
                                 stdout=_text(e.stdout), stderr=_text(e.stderr)) from None
        if check and proc.returncode != 0:
            raise EmulationError(f"{what} under {Path(cmd[0]).name} exited with "
                                 f"{_describe_rc(proc.returncode)}: {_tail(proc.stderr or proc.stdout)}",
                                 returncode=proc.returncode, stdout=proc.stdout, stderr=proc.stderr)
        return proc

    def run_python(self, script: str | os.PathLike, args: Sequence[str] = (),
                   env: Mapping[str, str] | None = None, timeout: float | None = None,
                   cwd: str | os.PathLike | None = None, check: bool = True
                   ) -> subprocess.CompletedProcess:
        """Run the Python file ``script`` (a host path) with the emulated aarch64 Python."""
        path = Path(script)
        if not path.is_file():
            raise EmulationError(f"python script not found: {path}")
        return self.run([self.python, path.resolve(), *map(str, args)], env=env, timeout=timeout,
                        cwd=cwd, check=check)

    def run_code(self, code: str, args: Sequence[str] = (), env: Mapping[str, str] | None = None,
                 timeout: float | None = None, cwd: str | os.PathLike | None = None,
                 check: bool = True) -> subprocess.CompletedProcess:
        """Run Python source ``code`` (``python -c``) with the emulated aarch64 Python."""
        return self.run([self.python, "-c", code, *map(str, args)], env=env, timeout=timeout,
                        cwd=cwd, check=check)


def _text(b) -> str | None:
    if b is None or isinstance(b, str):
        return b
    return b.decode(errors="replace")


def _describe_rc(rc: int) -> str:
    if rc < 0:
        import signal
        try:
            return f"signal {signal.Signals(-rc).name}"
        except ValueError:
            return f"signal {-rc}"
    return f"status {rc}"


def _tail(text: str | None, lines: int = 4) -> str:
    kept = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return " | ".join(kept[-lines:]) or "(no output)"


# --------------------------------------------------------------------------------------------------
# Building the sysroot
# --------------------------------------------------------------------------------------------------

class _Progress:
    def __init__(self, enabled: bool, arch: str):
        self.enabled = enabled
        self.arch = arch
        self.t0 = time.monotonic()

    def __call__(self, msg: str) -> None:
        if self.enabled:
            print(f"ffcompile: [{self.arch} sysroot {time.monotonic() - self.t0:6.1f}s] {msg}",
                  file=sys.stderr, flush=True)


def _run_host(cmd: Sequence[str], what: str, env: Mapping[str, str] | None = None,
              echo=None, cwd: str | os.PathLike | None = None, timeout: float | None = None) -> str:
    """Run a host command; on failure raise EmulationError naming ``what``. ``echo(line)`` sees
    each output line as it arrives. Returns the combined output."""
    try:
        proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, text=True, errors="replace",
                                env=dict(env) if env is not None else None, cwd=cwd)
    except FileNotFoundError:
        raise _missing_tool(Path(cmd[0]).name) from None
    expired = threading.Event()
    timer = threading.Timer(timeout, lambda: (expired.set(), proc.kill())) if timeout else None
    if timer:
        timer.start()
    lines = []
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            lines.append(line)
            if echo:
                echo(line.rstrip("\n"))
        rc = proc.wait()
    finally:
        if timer:
            timer.cancel()
        if proc.poll() is None:  # echo raised
            proc.kill()
            proc.wait()
    out = "".join(lines)
    if expired.is_set():
        raise EmulationError(f"{what} timed out after {timeout:g} s", stdout=out)
    if rc != 0:
        raise EmulationError(f"{what} failed ({_describe_rc(rc)}): {_tail(out, 3)}",
                             returncode=rc, stdout=out)
    return out


def _dir_size(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _rmtree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _host_apt_acquire_settings() -> str:
    """The host's Acquire:: network settings (proxies, TLS, retries, snapshot validity), so the
    private apt reaches the mirror the way the host's apt does."""
    try:
        out = subprocess.run(["apt-config", "dump"], capture_output=True, text=True, timeout=30,
                             stdin=subprocess.DEVNULL).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    keep = re.compile(r'^Acquire::(https?|ftp|Retries|ForceIPv4|ForceIPv6|Check-Valid-Until|'
                      r'Check-Date|Max-ValidTime|Min-ValidTime|Queue-Mode)\b')
    return "".join(line + "\n" for line in out.splitlines()
                   if keep.match(line) and line.rstrip().endswith(";"))


def _write_private_apt(apt: Path, arch: _Arch, sources: list[AptSource]) -> Path:
    """An apt configuration that keeps every piece of state under ``apt`` (nothing of the host's
    dpkg/apt state is read or written) and sees only the arm64 Debian sources."""
    for sub in ("lists/partial", "cache/archives/partial", "state", "log", "etc/sources.list.d",
                "etc/preferences.d", "etc/apt.conf.d", "etc/trusted.gpg.d", "keys"):
        (apt / sub).mkdir(parents=True, exist_ok=True)
    (apt / "status").write_text("")
    lines = []
    for i, s in enumerate(sources):
        opts = [f"arch={arch.debian}"]
        key = s.signed_by
        if key and "\n" in key:  # inline key (deb822) -> a file apt can read
            kf = apt / "keys" / f"source{i}.asc"
            kf.write_text(key.strip() + "\n")
            key = str(kf)
        if not key and Path("/usr/share/keyrings/debian-archive-keyring.gpg").exists():
            key = "/usr/share/keyrings/debian-archive-keyring.gpg"
        if key:
            opts.append(f"signed-by={key}")
        for suite in s.suites:
            lines.append(f"deb [{' '.join(opts)}] {s.uri} {suite} main")
    (apt / "etc/sources.list").write_text("\n".join(dict.fromkeys(lines)) + "\n")
    conf = apt / "apt.conf"
    conf.write_text(
        f'APT::Architecture "{arch.debian}";\n'
        f'APT::Architectures {{ "{arch.debian}"; }};\n'
        f'Dir::State "{apt}/state/";\n'
        f'Dir::State::Lists "{apt}/lists/";\n'
        f'Dir::State::status "{apt}/status";\n'
        f'Dir::Cache "{apt}/cache/";\n'
        f'Dir::Log "{apt}/log/";\n'
        # Read no host configuration: not /etc/apt/apt.conf(.d) hooks, pins or sources.
        f'Dir::Etc::main "{apt}/etc/apt.conf";\n'
        f'Dir::Etc::Parts "{apt}/etc/apt.conf.d/";\n'
        f'Dir::Etc::SourceList "{apt}/etc/sources.list";\n'
        f'Dir::Etc::SourceParts "{apt}/etc/sources.list.d/";\n'
        f'Dir::Etc::Preferences "{apt}/etc/preferences";\n'
        f'Dir::Etc::PreferencesParts "{apt}/etc/preferences.d/";\n'
        'Acquire::Languages "none";\n'
        'APT::Install-Recommends "false";\n'
        'APT::Install-Suggests "false";\n'
        'APT::Sandbox::User "root";\n'
        'Debug::NoLocking "true";\n'  # ffcompile holds its own lock on the cache directory
        + _host_apt_acquire_settings()
    )
    return conf


def _apt_env(conf: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(APT_CONFIG=str(conf), DEBIAN_FRONTEND="noninteractive", LC_ALL="C")
    return env


def _parse_print_uris(out: str) -> list[tuple[str, str, int]]:
    """(uri, filename, size) of each package ``apt-get --print-uris`` would download."""
    res = []
    for line in out.splitlines():
        m = re.match(r"^'([^']+)'\s+(\S+)\s+(\d+)", line)
        if m:
            res.append((m.group(1), m.group(2), int(m.group(3))))
    return res


def _deb_version(filename: str) -> tuple[str, str]:
    name, version = filename.split("_")[:2]
    return name, version.replace("%3a", ":")


def _build_debian(dest: Path, work: Path, arch: _Arch, py: str, say: _Progress) -> dict:
    _which("apt-get")
    _which("dpkg-deb")
    sources = _sources_for(arch)
    say("using Debian sources: " + "; ".join(f"{s.uri} {' '.join(s.suites)}" for s in sources))
    apt = work / "apt"
    conf = _write_private_apt(apt, arch, sources)
    env = _apt_env(conf)
    say(f"apt-get update ({arch.debian} package lists, private apt state in {apt})")
    _run_host(["apt-get", "-q", "update"], "apt-get update (private arm64 state)", env=env)
    packages = [p.format(py=py) for p in _DEBIAN_PACKAGES]
    uris = _parse_print_uris(_run_host(
        ["apt-get", "-q", "-y", "install", "--print-uris", "-qq", *packages],
        f"resolving {' '.join(packages)} for {arch.debian}", env=env))
    total = sum(size for _u, _f, size in uris)
    say(f"downloading {len(uris)} {arch.debian} .debs ({_mb(total)})")
    done = [0]

    def echo(line: str) -> None:
        if line.startswith("Get:"):
            done[0] += 1
            if done[0] % 10 == 0 or done[0] == len(uris):
                say(f"  {done[0]}/{len(uris)} .debs")
    _run_host(["apt-get", "-q", "-y", "install", "--download-only", *packages],
              f"downloading {' '.join(packages)} ({arch.debian})", env=env, echo=echo)
    debs = sorted((apt / "cache/archives").glob("*.deb"))
    if not debs:
        raise EmulationError(f"apt downloaded no .deb files into {apt}/cache/archives")
    say(f"unpacking {len(debs)} .debs into {dest}")
    dest.mkdir(parents=True, exist_ok=True)
    versions = {}
    for deb in debs:
        _run_host(["dpkg-deb", "-x", str(deb), str(dest)], f"unpacking {deb.name}")
        name, version = _deb_version(deb.name)
        versions[name] = version
    python = dest / "usr/bin" / f"python{py}"
    if not python.exists():
        raise EmulationError(f"the unpacked packages hold no usr/bin/python{py}")
    if not is_elf_for(python, arch.name):
        raise EmulationError(f"{python} is built for {elf_machine(python)}, expected {arch.name}")
    # onnxruntime (through pytorch/cpuinfo) parses /proc/cpuinfo at import and crashes on the
    # host's x86 one; qemu's -L makes the guest read ROOT/proc/cpuinfo instead.
    if arch.cpuinfo:
        (dest / "proc").mkdir(exist_ok=True)
        n = os.cpu_count() or 1
        (dest / "proc/cpuinfo").write_text("".join(arch.cpuinfo.format(n=i) for i in range(n)))
    return {"debs": versions, "sources": [f"{s.uri} {' '.join(s.suites)}" for s in sources]}


def _glibc_minor(debs: Mapping[str, str]) -> int:
    m = re.match(r"(?:\d+:)?2\.(\d+)", debs.get("libc6", ""))
    return int(m.group(1)) if m else 17


def _host_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _wanted_wheels(packages: Iterable[str]) -> list[tuple[str, str | None]]:
    """(name, pinned version or None): the host's installed version where there is one."""
    out = []
    for name in packages:
        name = name.strip()
        if "==" in name:
            n, v = name.split("==", 1)
            out.append((n.strip(), v.strip()))
            continue
        out.append((name, _host_version(name) or _FIXED_PINS.get(name)))
    return out


def _pip_platform_args(arch: _Arch, py: str, glibc_minor: int) -> list[str]:
    args = ["--only-binary=:all:", "--implementation", "cp", "--python-version", py,
            "--abi", f"cp{py.replace('.', '')}", "--abi", "abi3", "--abi", "none"]
    for minor in range(glibc_minor, 16, -1):
        args += ["--platform", f"manylinux_2_{minor}_{arch.wheel}"]
    args += ["--platform", f"manylinux2014_{arch.wheel}"]
    return args


def _spec(name: str, version: str | None) -> str:
    return f"{name}=={version}" if version else name


def _pip_download(specs: list[str], dest: Path, plat: list[str], echo=None) -> None:
    _run_host([sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "off",
               "--disable-pip-version-check", "-d", str(dest), *plat, *specs],
              f"pip download {' '.join(specs)}", echo=echo)


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _install_wheel(whl: Path, site: Path) -> None:
    """Unpack a wheel into ``site`` (what ``pip install --target`` does for platlib/purelib)."""
    with zipfile.ZipFile(whl) as z:
        for info in z.infolist():
            parts = info.filename.split("/")
            if ".." in parts or info.filename.startswith("/"):
                raise EmulationError(f"{whl.name} holds an unsafe path: {info.filename}")
            if parts[0].endswith(".data") and len(parts) > 2:
                if parts[1] not in ("purelib", "platlib"):
                    continue  # scripts, headers, data: not needed on the device
                target = site.joinpath(*parts[2:])
            else:
                target = site.joinpath(*parts)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with z.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
            mode = (info.external_attr >> 16) & 0o777
            if mode:
                os.chmod(target, mode | 0o600)


def _build_wheels(dest: Path, work: Path, arch: _Arch, py: str, glibc_minor: int,
                  wanted: list[tuple[str, str | None]], say: _Progress) -> dict:
    wheels = work / "wheels"
    _rmtree(wheels)
    wheels.mkdir(parents=True)
    plat = _pip_platform_args(arch, py, glibc_minor)
    say(f"downloading {len(wanted)} {arch.wheel} wheels for Python {py} "
        f"(manylinux up to glibc 2.{glibc_minor}): "
        + ", ".join(_spec(n, v) for n, v in wanted))

    def echo(line: str) -> None:
        m = re.match(r"^\s*(?:Saved|File was already downloaded)\s+(\S+)", line)
        if m:
            say(f"  {Path(m.group(1)).name}")
    unpinned = []
    try:
        _pip_download([_spec(n, v) for n, v in wanted], wheels, plat, echo=echo)
    except EmulationError:
        # One at a time, to find which pin has no aarch64 wheel and fall back for it alone.
        for name, version in wanted:
            if any(_canon(p.name).startswith(_canon(name) + "-") for p in wheels.glob("*.whl")):
                continue
            try:
                _pip_download([_spec(name, version)], wheels, plat, echo=echo)
            except EmulationError as e:
                if not version or name in _FIXED_PINS:
                    raise EmulationError(f"no {arch.wheel} wheel for {_spec(name, version)} "
                                         f"(Python {py}): {e}") from None
                say(f"  no {arch.wheel} wheel for {name}=={version} (the host's version); "
                    f"using the newest {name} instead")
                _pip_download([name], wheels, plat, echo=echo)
                unpinned.append(name)
    files = sorted(wheels.glob("*.whl"))
    got = {}
    for whl in files:
        name, version = whl.name.split("-")[:2]
        got[_canon(name)] = version
    missing = [n for n, _v in wanted if _canon(n) not in got]
    if missing:
        raise EmulationError(f"pip downloaded no wheel for {', '.join(missing)}")
    size = sum(p.stat().st_size for p in files)
    say(f"installing {len(files)} wheels ({_mb(size)}) into {dest}")
    dest.mkdir(parents=True, exist_ok=True)
    for whl in files:
        _install_wheel(whl, dest)
    pruned = []
    for rel in _PRUNE:
        if (dest / rel).exists():
            (dest / rel).unlink()
            pruned.append(rel)
    if pruned:
        say(f"removed {', '.join(pruned)} (the device loads only the TVM runtime)")
    return {"wheels": got, "unpinned": unpinned, "wheel_bytes": size, "pruned": pruned}


def _compile_pyc(paths: list[Path], say: _Progress) -> None:
    """Byte-compile with the host Python (same 3.X bytecode): far faster than letting the emulated
    interpreter do it at each start (and it may not write them: PYTHONDONTWRITEBYTECODE)."""
    host_py = f"{sys.version_info.major}.{sys.version_info.minor}"
    say(f"byte-compiling {', '.join(p.name for p in paths)} with the host Python {host_py}")
    for p in paths:
        # compileall returns 1 when some file (e.g. a Python-2-era test fixture) does not compile:
        # that only means no .pyc for that one file, so the status is not checked.
        subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", str(p)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       stdin=subprocess.DEVNULL)


_SMOKE = r"""
import json, platform, sys, time
t0 = time.perf_counter()
import numpy
t1 = time.perf_counter()
import onnxruntime
t2 = time.perf_counter()
import tvm
import tvm.runtime.vm  # not imported by `import tvm` when only the runtime library is loaded
t3 = time.perf_counter()
vm = tvm.runtime.vm.VirtualMachine
print(json.dumps({
    "machine": platform.machine(), "python": platform.python_version(),
    "numpy": numpy.__version__, "onnxruntime": onnxruntime.__version__, "tvm": tvm.__version__,
    "providers": onnxruntime.get_available_providers(),
    "import_s": {"numpy": t1 - t0, "onnxruntime": t2 - t1, "tvm": t3 - t2},
}))
"""


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _locked(cache_dir: Path, say: _Progress):
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another process building {cache_dir}")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _sysroot_from(cache_dir: Path, arch: _Arch, py: str, info: dict) -> Sysroot:
    root = cache_dir / "root"
    return Sysroot(root=root, site=cache_dir / "site", python=root / "usr/bin" / f"python{py}",
                   arch=arch.name, info=info)


def ensure_sysroot(arch: str = "aarch64", cache_dir: str | os.PathLike | None = None,
                   progress: bool = True, *, rebuild: bool = False,
                   packages: Sequence[str] = DEVICE_WHEELS) -> Sysroot:
    """The aarch64 sysroot, built on first use and cached in ``cache_dir``
    (default :func:`default_cache_dir`).

    The cache is laid out as ``root/`` (Debian's arm64 Python and libraries), ``site/`` (the
    aarch64 wheels), ``work/`` (private apt state, downloads; removed after a build) and
    ``COMPLETE.json``, written last: a directory without it (an interrupted build) is built again.
    Each of ``root/`` and ``site/`` is built in a ``.partial`` directory and renamed when done, so a
    change of the host's package versions redoes only the wheels. Progress goes to stderr.

    ``packages``: the wheels to install; each is pinned to the host's installed version (``name==v``
    overrides; a pin with no aarch64 wheel falls back to the newest, with a progress line).
    """
    a = _emulated_arch(arch)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir(a.name)
    cache = cache.absolute()
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    wanted = _wanted_wheels(packages)
    debian_key = _key({"format": _FORMAT, "arch": a.name, "py": py, "debs": _DEBIAN_PACKAGES,
                       "cpuinfo": a.cpuinfo})
    wheels_key = _key({"format": _FORMAT, "arch": a.name, "py": py, "wheels": wanted,
                       "prune": _PRUNE})
    full_key = _key([debian_key, wheels_key])

    def complete(marker: dict | None) -> bool:
        return (not rebuild and bool(marker) and marker.get("key") == full_key
                and (cache / "root/usr/bin" / f"python{py}").exists() and (cache / "site").is_dir())

    marker = _read_json(cache / _MARKER)
    if complete(marker):
        return _sysroot_from(cache, a, py, marker)

    say = _Progress(progress, a.name)
    with _locked(cache, say):
        marker = _read_json(cache / _MARKER)  # another process may have finished meanwhile
        if complete(marker):
            return _sysroot_from(cache, a, py, marker)
        t_start = time.monotonic()
        if marker:
            say("cached sysroot is out of date (host package versions or recipe changed): updating")
        elif (cache / "root").exists() or (cache / "site").exists():
            say(f"finishing an incomplete {a.name} sysroot in {cache}")
        else:
            say(f"building the {a.name} sysroot in {cache} (first use; downloads ~150 MB)")
        check_host_tools(a.name)
        _which("apt-get")
        _which("dpkg-deb")
        if subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True,
                          stdin=subprocess.DEVNULL).returncode != 0:
            raise EmulationError(f"pip is not available for {sys.executable}: install it "
                                 "(Debian package python3-pip, or python -m ensurepip)")
        (cache / _MARKER).unlink(missing_ok=True)
        work = cache / "work"
        info: dict = {}

        root, site = cache / "root", cache / "site"
        stage = _read_json(root / _STAGE_MARKER)
        if rebuild or not stage or stage.get("key") != debian_key:
            part = cache / "root.partial"
            _rmtree(part)
            _rmtree(work / "apt")
            t = time.monotonic()
            deb_info = _build_debian(part, work, a, py, say)
            deb_info.update(key=debian_key, seconds=round(time.monotonic() - t, 1))
            _compile_pyc([part / "usr/lib" / f"python{py}"], say)
            (part / _STAGE_MARKER).write_text(json.dumps(deb_info, indent=1, sort_keys=True))
            _rmtree(root)
            _rmtree(site)  # wheels are matched to this root's glibc
            part.rename(root)
            stage = deb_info
        else:
            say("Debian part already built")
        info["debian"] = stage

        wstage = _read_json(site / _STAGE_MARKER)
        if rebuild or not wstage or wstage.get("key") != wheels_key:
            part = cache / "site.partial"
            _rmtree(part)
            t = time.monotonic()
            w_info = _build_wheels(part, work, a, py, _glibc_minor(stage["debs"]), wanted, say)
            _compile_pyc([part], say)
            w_info.update(key=wheels_key, seconds=round(time.monotonic() - t, 1))
            (part / _STAGE_MARKER).write_text(json.dumps(w_info, indent=1, sort_keys=True))
            _rmtree(site)
            part.rename(site)
            wstage = w_info
        else:
            say("wheels already installed")
        info["wheels"] = wstage
        _rmtree(work)

        sysroot = _sysroot_from(cache, a, py, info)
        say("checking: import numpy, onnxruntime, tvm under qemu")
        t = time.monotonic()
        proc = sysroot.run_code(_SMOKE, timeout=900)
        smoke_s = time.monotonic() - t
        try:
            smoke = json.loads(proc.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise EmulationError(f"sysroot check printed no result: {_tail(proc.stdout)}") from None
        if smoke.get("machine") != a.name:
            raise EmulationError(f"sysroot check ran on {smoke.get('machine')}, not {a.name}")
        for dist, mod in (("numpy", "numpy"), ("onnxruntime", "onnxruntime"), ("apache-tvm", "tvm")):
            want = wstage["wheels"].get(_canon(dist))
            if want and smoke.get(mod) != want:
                raise EmulationError(f"sysroot check found {mod} {smoke.get(mod)}, expected {want}")
        smoke["seconds"] = round(smoke_s, 1)
        info.update(
            key=full_key, format=_FORMAT, arch=a.name, python_version=smoke.get("python"),
            check=smoke, root_bytes=_dir_size(root), site_bytes=_dir_size(site),
            build_seconds=round(time.monotonic() - t_start, 1),
            built_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )
        # The completion marker, written last and atomically.
        fd, tmp = tempfile.mkstemp(dir=cache, prefix=".marker.")
        with os.fdopen(fd, "w") as f:
            json.dump(info, f, indent=1, sort_keys=True)
        os.replace(tmp, cache / _MARKER)
        say(f"done in {info['build_seconds']:.0f}s: root {_mb(info['root_bytes'])}, "
            f"site {_mb(info['site_bytes'])}; import numpy+onnxruntime+tvm took {smoke_s:.1f}s "
            "under qemu")
        return sysroot
