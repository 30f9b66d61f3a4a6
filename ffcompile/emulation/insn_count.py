"""Guest instruction counts under qemu-user: ``insn_count.c``, a TCG plugin built once per cache
with the host's C compiler, counts the aarch64 instructions the guest executes and records the
count at each mark the guest makes (``ffcompile.runtime.device_check.mark``).

Counts of single-threaded guest code repeat to within about 0.1 % between runs (Python and the
runtime take slightly different paths each time) and measure work in the emulated ISA,
not time: they say how a bundle's programs compare with each other (int8 against float32, one
row against a batch), not how fast a real core runs them.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

from .qemu import EmulationError, _which

SOURCE = Path(__file__).with_name("insn_count.c")


def counter_plugin(cache_dir: Path) -> Path:
    """The plugin's shared library, built into ``cache_dir`` on first use."""
    source = SOURCE.read_bytes()
    lib = Path(cache_dir) / f"insn_count-{hashlib.sha256(source).hexdigest()[:16]}.so"
    if lib.is_file():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    tmp = lib.with_name(f".{lib.name}.{os.getpid()}")
    proc = subprocess.run([_which("gcc"), "-shared", "-fPIC", "-O2", "-o", str(tmp), str(SOURCE)],
                          capture_output=True, text=True)
    if proc.returncode:
        raise EmulationError(f"building the qemu instruction-count plugin failed: {proc.stderr.strip()[-300:]}")
    os.replace(tmp, lib)
    return lib


def plugin_args(lib: Path, out: Path) -> list[str]:
    """qemu-user options that attach the counter, writing its counts to ``out``."""
    return ["-plugin", f"{lib},out={out}"]


def counts_between_marks(out: Path, calls: list[dict]) -> list[dict]:
    """``calls`` (``device_check.count_calls``' list, two marks each) with the instructions of
    one call and of one row."""
    marks = [int(line) for line in Path(out).read_text().split()][:-1]  # the last line is the total
    if len(marks) != 2 * len(calls):
        raise EmulationError(f"instruction counter: expected {2 * len(calls)} marks, found {len(marks)}")
    counted = []
    for call, start, end in zip(calls, marks[::2], marks[1::2]):
        per_call = (end - start) / call["calls"]
        counted.append({**call, "instructions_per_call": int(per_call), "instructions_per_row": int(per_call / call["rows"])})
    return counted
