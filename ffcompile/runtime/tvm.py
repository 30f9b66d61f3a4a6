"""Run a TVM-compiled program (a shared library + its JSON sidecar of input/output names) with
only the TVM runtime (works with ``TVM_USE_RUNTIME_LIB=1``); ``ffcompile.compiler.tvm_build``
makes them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

SIDECAR_SUFFIX = ".json"


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR_SUFFIX)


def _aligned_empty(shape, dtype, align: int = 64) -> np.ndarray:
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(n + align, dtype=np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off:off + n].view(dtype).reshape(shape)


_LOADED: dict[str, str] = {}  # resolved path -> sha256 of the library this process first loaded from it


def usable_cores() -> int:
    """Physical cores this process may run on: CPUs in its affinity mask, SMT siblings counted once."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text(), (topology / "core_id").read_text()))
        except OSError:
            cores.add(cpu)
    return max(1, len(cores))


_POOL_SIZED = False


def _size_thread_pool() -> None:
    """Create TVM's CPU thread pool with one thread per usable core, unless TVM_NUM_THREADS or
    OMP_NUM_THREADS says otherwise, and leave this thread free to run on every CPU it could before.

    TVM's own default is half the logical CPUs on x86, on the assumption of two SMT threads per
    core: on machines without SMT (most small cloud VMs) it runs programs scheduled for every core
    on half of them. And a one-thread pool pins the thread that creates it to one CPU, which leaves
    every torch step after it in the same process (the parity reference) on one core too.
    The pool is sized once per process, on first use, so this runs before any library is loaded."""
    global _POOL_SIZED
    if _POOL_SIZED:
        return
    _POOL_SIZED = True
    import tvm

    if "TVM_NUM_THREADS" not in os.environ and "OMP_NUM_THREADS" not in os.environ:
        os.environ["TVM_NUM_THREADS"] = str(usable_cores())
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    tvm.get_global_func("runtime.NumThreads")()  # creates the pool now
    if cpus is not None and os.sched_getaffinity(0) != cpus:
        os.sched_setaffinity(0, cpus)


def _load_library(path: Path):
    """``tvm.runtime.load_module``, safe against a library rebuilt at a path this process has
    loaded before: dlopen returns the first library for a path, so a changed one is loaded from a
    copy of its own."""
    import hashlib
    import shutil
    import tempfile

    import tvm

    _size_thread_pool()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if _LOADED.setdefault(str(path.resolve()), digest) != digest:
        copy = Path(tempfile.mkdtemp(prefix="ffcompile-tvm-")) / f"{digest[:16]}{path.suffix}"
        shutil.copyfile(path, copy)
        path = copy
    return tvm.runtime.load_module(str(path))


class TVMProgram:
    """A compiled program loaded with only the TVM runtime."""

    def __init__(self, path: str | Path, device: str = "cpu", device_id: int = 0):
        import tvm

        self.path = Path(path)
        meta = json.loads(sidecar_path(self.path).read_text())
        self.meta = meta
        self.input_names: list[str] = [i["name"] for i in meta["inputs"]]
        self.output_names: list[str] = [o["name"] for o in meta["outputs"]]
        self._in_dtypes = [np.dtype(i["dtype"]) for i in meta["inputs"]]
        self._single = len(self.output_names) == 1
        self._staging: dict[str, np.ndarray] = {}
        copy = set(meta.get("copy_outputs", self.output_names))
        self._copy = [n in copy for n in self.output_names]
        # {output: input} written over the input (compiler.tvm_in_place); empty for older builds
        self.in_place: dict[str, str] = dict(meta.get("in_place", {}))
        self._overwritten = set(self.in_place.values())
        # the most one call holds beyond its inputs, by the compiler's memory plan (CPU builds)
        self.planned_working_bytes: int | None = meta.get("planned_working_bytes")
        # an input as wrapped for the last call, without a copy or (one the program writes over)
        # into a fresh buffer: (array, tvm tensor). A loop that feeds the same array back is handed
        # the same tensor; for an input written over, the array is also the output
        self._wrapped: dict[str, tuple] = {}
        self.device = tvm.runtime.device(device, device_id)
        self._host = self.device.dlpack_device_type() == 1  # numpy shares its memory (a call per query)
        lib = _load_library(self.path)
        from tvm.runtime.vm import VirtualMachine  # (not imported by `import tvm` in runtime-only mode)

        self._vm = VirtualMachine(lib, self.device)
        self._fn = self._vm[meta["function"]]

    def _to_tvm(self, name: str, arr, dtype: np.dtype, donate: bool = False):
        """numpy -> tvm tensor. On CPU, a C-contiguous, 64-byte aligned array of the right dtype
        (e.g. an output of the previous ``run``) is passed without a copy, except an input the
        program writes over (``in_place``) that is not ``donate``d; anything else is copied into
        an aligned buffer: a persistent staging buffer, or a fresh one for an input the program
        writes over, as it becomes an output (``tvm.runtime.tensor`` is ~8x slower than a plain
        memcpy for large arrays). (``_call`` hands the same array fed again over as the tensor
        already wrapped around it.) Not thread-safe (neither is the VM)."""
        import tvm

        if not self._host:
            return tvm.runtime.tensor(np.asarray(arr, dtype=dtype), self.device)
        overwritten = name in self._overwritten
        a = np.asarray(arr)
        if (a.dtype == dtype and a.flags.c_contiguous and a.flags.writeable and a.ctypes.data % 64 == 0
                and (donate or not overwritten)):
            try:
                return self._keep(name, a, tvm.runtime.from_dlpack(a))
            except Exception:  # pragma: no cover - fall back to a copy
                pass
        if overwritten:
            buf = _aligned_empty(a.shape, dtype)
        else:
            buf = self._staging.get(name)
            if buf is None or buf.shape != a.shape:
                buf = self._staging[name] = _aligned_empty(a.shape, dtype)
        np.copyto(buf, a, casting="same_kind")
        tensor = tvm.runtime.from_dlpack(buf)
        return self._keep(name, buf, tensor) if overwritten else tensor

    def _keep(self, name: str, array: np.ndarray, tensor):
        self._wrapped[name] = (array, tensor)
        return tensor

    def _call(self, feeds: dict, donate: bool):
        import tvm

        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise KeyError(f"missing inputs: {missing}")
        args = []
        wrapped, overwritten = self._wrapped, self._overwritten
        for n, dt in zip(self.input_names, self._in_dtypes):
            v = feeds[n]
            last = wrapped.get(n)
            if last is not None and last[0] is v and (donate or n not in overwritten):
                args.append(last[1])  # the array fed last time (a training loop's state)
            elif isinstance(v, tvm.runtime.Tensor):
                wrapped.pop(n, None)
                args.append(v)
            else:
                args.append(self._to_tvm(n, v, dt, donate))
        return self._fn(*args)

    def run_tvm(self, feeds: dict, donate: bool = False):
        """Run with numpy arrays or tvm tensors; returns the VM's output tensors (no copies). A
        tvm tensor fed for an input the program writes over is overwritten whatever ``donate``."""
        res = self._call(feeds, donate)
        return dict(zip(self.output_names, [res] if self._single else list(res)))

    def run(self, feeds: dict[str, np.ndarray], donate: bool = False) -> dict[str, np.ndarray]:
        """Run one step. Inputs that are 64-byte aligned C-contiguous arrays (e.g. outputs of a
        previous ``run``) are passed without a copy; outputs are returned as numpy arrays that
        own the VM's fresh output buffers (no copy), except outputs that could alias inputs or
        constants, which are copied. A train step computes most of its new state over the old
        (``in_place``: output -> input): with ``donate``, the caller gives up those input arrays,
        which then hold the new values (the outputs share their memory); without, the program
        works on copies and the caller's arrays stay as they were."""
        res = self._call(feeds, donate)
        result = {}
        for i, (n, copy) in enumerate(zip(self.output_names, self._copy)):
            source = self.in_place.get(n)
            if source in self._wrapped and self._host and not copy:
                result[n] = self._wrapped[source][0]  # the output is the input's buffer, as wrapped
                continue
            o = res if self._single else res[i]
            result[n] = o.numpy() if copy or not self._host else np.from_dlpack(o)
        return result


def load(path: str | Path, device: str = "cpu", device_id: int = 0) -> TVMProgram:
    return TVMProgram(path, device, device_id)
