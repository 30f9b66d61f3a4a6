"""The bundle compiler: a model (spec or trained checkpoint) + a target -> a self-contained,
verified bundle directory (layout in ``ffcompile.contract.manifest``).

The bundle is assembled in a temporary sibling directory and renamed into place only once
everything, the parity report included, is written: an interrupted build leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import platform
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from .. import __version__
from ..contract.checkpoint import CHECKPOINT, load_checkpoint
from ..contract.integrity import load_private_key, sign_bundle, write_digest
from ..contract.locking import exclusive, remove_stale
from ..contract.manifest import (FORMAT, FORMAT_VERSION, MANIFEST, OPTIMIZER, PARITY, PROGRAMS_DIR, WEIGHTS,
                                 checksums, is_bundle_dir, sha256_file)
from ..contract.rename import exchange
from ..contract.weights import save_tensors
from ..core.errors import FFCompileError
from ..core.family import Family
from ..core.shipped import shipped_model
from ..core.spec import Model, load_model
from ..core.spec_limits import MAX_BATCH
from ..loop.progress import Phase
from ..lowering import build_program, bundle_programs, init_state, is_train_program
from ..runtime.loaders import load_program
from ..runtime.machine import why_not_here
from .quantize import DEFAULT_BUDGET, DTYPES, budget_error, check_reduced_programs, write_reduced
from .targets import Target, find_target, known_targets

DEFAULT_INFER_BATCH = 100


@dataclasses.dataclass
class Source:
    model: Model
    params: dict
    state: dict
    epoch: int
    step: int
    description: str


def load_source(source, seed: int | None = None) -> Source:
    """A model spec (.toml/.json: fresh weights from ``init_state``), a run directory, or a
    checkpoint file."""
    path = Path(source)
    if not path.exists() and not path.suffix and shipped_model(str(path)) is not None:
        path = shipped_model(str(path))  # a shipped model spec by name
    if path.is_dir():
        path = path / CHECKPOINT
        if not path.is_file():
            raise FFCompileError(f"{source}: a run directory needs {CHECKPOINT} (none found)")
    if path.suffix == ".safetensors":
        ckpt = load_checkpoint(path)
        return Source(ckpt.model, ckpt.params, ckpt.state, ckpt.epoch, ckpt.step,
                      f"checkpoint {path} (epoch {ckpt.epoch}, step {ckpt.step})")
    if path.suffix in (".toml", ".json"):
        model = load_model(path)
        seed = model.training.seed if seed is None else seed
        params, state = init_state(model, seed)
        return Source(model, params, state, 0, 0, f"model spec {path}, initial weights (seed {seed})")
    raise FFCompileError(f"{source}: expected a model spec (.toml/.json), a run directory or a checkpoint .safetensors")


def _compile_onnx(program, model: Model, target: Target, out_dir: Path) -> str:
    from .onnx_emit import shipped_onnx

    rel = f"{PROGRAMS_DIR}/{program.name}.onnx"
    proto = shipped_onnx(program, doc=f"ffcompile {program.name} for {model.name} ({target.name})")
    (out_dir / rel).write_bytes(proto.SerializeToString())
    return rel


def _compile_tvm(program, model: Model, target: Target, out_dir: Path) -> str:
    """ONNX (no Scan tiling: TVM's ONNX frontend has no Scan) -> TVM -> programs/<name>.so plus
    its sidecar programs/<name>.so.json (input/output names); both are checksummed."""
    from .onnx_emit import to_onnx
    from .tvm_build import compile_onnx

    cc = None
    if target.cc is not None:
        from ..emulation.qemu import _which  # one-line error naming the Debian package

        cc = _which(target.cc)
    rel = f"{PROGRAMS_DIR}/{program.name}.so"
    proto = to_onnx(program, doc=f"ffcompile {program.name} for {model.name} ({target.name})", fuse=False)
    compile_onnx(proto, target.tvm, out_dir / rel, cc=cc)
    return rel


def _log_planned_memory(name: str, library: Path, log) -> None:
    """A TVM CPU library's planned working memory per call (``planned_working_bytes``)."""
    from ..runtime.tvm import sidecar_path

    sidecar = sidecar_path(library)
    planned = json.loads(sidecar.read_text()).get("planned_working_bytes") if sidecar.is_file() else None
    if planned is not None:
        log(f"{name}: {planned / 2**20:.1f} MiB of working memory per call beyond its inputs (the compiler's memory plan)")


# One compiler per target backend: (program, model, target, bundle dir) -> the file's relative path.
COMPILERS = {"onnxruntime": _compile_onnx, "tvm": _compile_tvm}


def versions() -> dict:
    import numpy
    import onnx
    import onnxruntime
    import safetensors

    return {"ffcompile": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "numpy": numpy.__version__, "safetensors": safetensors.__version__, "python": platform.python_version()}


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise FFCompileError(f"{out_dir}: exists and is not a directory; refusing to overwrite it")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not is_bundle_dir(out_dir):
        raise FFCompileError(f"{out_dir}: exists and is not a bundle; refusing to overwrite it (choose another -o)")


def _readable(root: Path) -> None:
    """mkdtemp and safetensors create owner-only files; a bundle gets ordinary permissions."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move the finished bundle into place; an older bundle there is replaced as a whole, in one
    step (the two folders are exchanged), so ``out_dir`` always holds a whole bundle. Where the
    file system cannot exchange, the old bundle is moved aside first; a kill between the two
    renames is undone by the next build (``_recover``)."""
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    if exchange(tmp, out_dir):
        shutil.rmtree(tmp, ignore_errors=True)  # now the old bundle
        return
    old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
    os.replace(out_dir, old / "bundle")
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def build_bundle(source, target, out_dir, batch: int | None = None, infer_batch: int = DEFAULT_INFER_BATCH,
                 verify_steps: int = 100, data_dir=None, seed: int | None = None, progress: bool = True,
                 log=print, sign_key=None, dtype: str = "float32", accuracy_budget: float = DEFAULT_BUDGET,
                 force: bool = False) -> dict:
    """Compile, write and verify a bundle; returns its manifest, with the bundle digest under
    ``manifest["digest"]`` (not stored in the file). The parity report is written as parity.json;
    a failed parity check aborts the build (its report is kept at OUT.parity-failed.json).
    ``sign_key``: a private key file (``ffcompile keygen``) to sign the bundle digest with.
    ``dtype`` other than float32: the inference programs also in that dtype (weights inside;
    see ``quantize``), checked against their reference and refused when they lose more than
    ``accuracy_budget`` points of validation accuracy, unless ``force``."""
    key = load_private_key(sign_key) if sign_key is not None else None
    out_dir = Path(out_dir)
    with exclusive(out_dir, "ffcompile build"):
        _recover(out_dir, log)
        return _build(source, target, out_dir, batch, infer_batch, verify_steps, data_dir, seed, progress, log, key,
                      Reduced(dtype, accuracy_budget, force))


def _recover(out_dir: Path, log) -> None:
    """Undo what a killed build left (call with the lock held): a bundle moved aside by a rebuild
    killed between its two renames goes back to ``out_dir``; temporary folders are removed."""
    name = glob.escape(out_dir.name)
    aside = sorted(out_dir.parent.glob(f".{name}.old-*/bundle"))
    if not out_dir.exists() and aside:
        os.replace(aside[-1], out_dir)
        log(f"restored the bundle {out_dir} that an interrupted rebuild had moved aside")
    remove_stale(out_dir.parent, (f".{name}.building-*", f".{name}.old-*"), log)


@dataclasses.dataclass(frozen=True)
class Reduced:
    """What ``build --dtype`` asked for."""
    dtype: str
    budget: float
    force: bool

    def check(self, target: Target) -> None:
        if self.dtype not in DTYPES:
            raise FFCompileError(f"--dtype: unknown dtype {self.dtype!r} (known: {', '.join(DTYPES)})")
        if self.dtype not in target.inference_dtypes:
            able = ", ".join(t.name for t in known_targets() if self.dtype in t.inference_dtypes) or "none"
            raise FFCompileError(f"target {target.name!r} builds inference programs in {', '.join(target.inference_dtypes)} "
                                 f"only, not {self.dtype} (targets with {self.dtype}: {able})")
        if not self.budget >= 0:
            raise FFCompileError(f"--accuracy-budget must be >= 0 percentage points, got {self.budget}")


def _build(source, target, out_dir: Path, batch, infer_batch, verify_steps, data_dir, seed, progress, log,
           key, reduced: Reduced) -> dict:
    target = find_target(target)
    reduced.check(target)
    if target.backend not in COMPILERS:
        raise FFCompileError(f"target {target.name!r}: this ffcompile cannot compile for backend {target.backend!r} "
                             f"(available: {', '.join(COMPILERS)})")
    if target.cc is not None:
        from ..emulation.qemu import _which

        _which(target.cc)  # before any work: one line naming the Debian package when it is missing
    _check_out_dir(out_dir)
    src = load_source(source, seed)
    model = src.model
    if reduced.dtype != "float32" and model.family is not Family.FEED_FORWARD:
        raise FFCompileError(f"--dtype {reduced.dtype}: reduced-precision programs are built for feed-forward models; "
                             f"model {model.name!r} is {model.family.value}")
    for option, value in (("--batch", batch), ("--infer-batch", infer_batch)):
        if value is not None and value > MAX_BATCH:
            raise FFCompileError(f"{option} must be at most {MAX_BATCH}, got {value} "
                                 "(the compiled programs hold a whole batch at once)")
    if batch is not None:
        if batch <= 0:
            raise FFCompileError(f"--batch must be positive, got {batch}")
        model = dataclasses.replace(model, training=dataclasses.replace(model.training, batch_size=batch))
    if infer_batch <= 0:
        raise FFCompileError(f"--infer-batch must be positive, got {infer_batch}")
    batches = {"train": model.training.batch_size, "infer": infer_batch}

    programs = [build_program(model, name, batches["train" if is_train_program(name) else "infer"])
                for name in bundle_programs(model)]

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.building-"))
    try:
        (tmp / PROGRAMS_DIR).mkdir()
        entries = {}
        for program in programs:
            program_batch = batches["train"] if is_train_program(program.name) else infer_batch
            with Phase(f"compile {program.name} (batch {program_batch}, {len(program.nodes)} ops) for {target.name}",
                       progress, log):
                rel = COMPILERS[target.backend](program, model, target, tmp)
            _log_planned_memory(program.name, tmp / rel, log)
            entries[program.name] = {"file": rel, "backend": target.backend, **program.signature()}
        save_tensors(tmp / WEIGHTS, src.params, model=model.name)
        save_tensors(tmp / OPTIMIZER, src.state, model=model.name, epoch=src.epoch, step=src.step,
                     optimizer=model.optimizer.kind)
        report = _parity(model, target.to_json(), tmp, entries, src, infer_batch, verify_steps, data_dir, seed,
                         progress, log)
        section = None
        if reduced.dtype != "float32":
            section, report["reduced_precision"] = _reduced_programs(model, target, tmp, src.params, data_dir,
                                                                     infer_batch, reduced, log)
        (tmp / PARITY).write_text(json.dumps(report, indent=1) + "\n")
        if report.get("passed") is False or not report.get("reduced_precision", {}).get("passed", True):
            failed = out_dir.parent / f"{out_dir.name}.parity-failed.json"
            shutil.copyfile(tmp / PARITY, failed)
            from ..reference.parity import summary_lines

            raise FFCompileError(f"parity check failed, bundle not written; report: {failed} "
                                 f"({' | '.join(line.strip() for line in summary_lines(report)[1:] if 'FAIL' in line)})")
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "model": model.to_json(), "target": target.to_json(),
            "batch": batches, "programs": entries,
            "weights": WEIGHTS, "optimizer": OPTIMIZER, "parity": PARITY,
            "training": {"epoch": src.epoch, "step": src.step},
            "source": src.description,
            "created": {"at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "by": "ffcompile build",
                        "host": {"arch": platform.machine(), "system": platform.system(), "python": sys.version.split()[0]}},
            "versions": versions(),
            "parity_passed": report.get("passed"),
        }
        if section is not None:
            manifest["reduced_precision"] = section
        manifest["files"] = checksums(tmp)
        manifest_bytes = (json.dumps(manifest, indent=1) + "\n").encode()
        (tmp / MANIFEST).write_bytes(manifest_bytes)
        digest = write_digest(tmp, manifest_bytes)
        if key is not None:
            log(f"signed by {sign_bundle(tmp, digest, key)}")
        _readable(tmp)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**manifest, "digest": digest}


def _reduced_programs(model: Model, target: Target, root: Path, params: dict, data_dir, infer_batch: int,
                      reduced: Reduced, log) -> tuple[dict, dict]:
    """The inference programs in ``reduced.dtype``: written, checked against their reference, and
    held to the accuracy budget (an error, unless forced)."""
    from ..reference.fake_quant import reduced_lines

    section = write_reduced(model, params, reduced.dtype, root, data_dir, infer_batch, sha256_file(root / WEIGHTS), log)
    section["accuracy_budget_points"] = reduced.budget
    report = check_reduced_programs(model, section, root, params, data_dir, infer_batch, reduced.budget,
                                    run_here=why_not_here(target.to_json()) is None)
    report["forced"] = reduced.force and not report["within_budget"]
    for line in reduced_lines(report):
        log(line)
    if not report["within_budget"] and not reduced.force:
        raise FFCompileError(budget_error(report))
    return section, report


def _parity(model, target: dict, root: Path, entries: dict, src: Source, infer_batch: int, steps: int, data_dir,
            seed, progress, log) -> dict:
    """Run the parity harness on the files just written, if this machine can run the target."""
    reason = why_not_here(target)
    proxy = host_proxy(target) if reason else None
    if reason and proxy is None:
        log(f"parity check skipped: {reason}; run `ffcompile verify` on a machine of the target")
        return {"format": "ffcompile-parity-1", "passed": None, "model": model.name, "target": target["name"],
                "backend": target["backend"], "device": target["device"], "skipped": reason}
    from ..data.datasets import load_model_split
    from ..reference.parity import summary_lines, verify

    source, x, y = load_model_split(model, data_dir, "train")
    if proxy is None:
        runners = {name: load_program(root / e["file"], target, e["file"], e) for name, e in entries.items()}
    else:
        log(f"parity on a host proxy: {proxy['what']}")
        runners = _proxy_runners(model, proxy, root, entries, infer_batch)
    report = verify(model, target, runners, src.params, src.state, src.step, x, y, infer_batch, steps, seed,
                    data=source.describe(), progress=progress, log=log)
    if proxy is not None:
        report["host_proxy"] = {"why": reason, "what": proxy["what"], "proxy_target": proxy["target"],
                                "device_check": "ffcompile verify BUNDLE --emulate (aarch64 under qemu) or "
                                                "ffcompile verify BUNDLE on the device"}
    for line in summary_lines(report):
        log(line)
    return report


def host_proxy(target: dict) -> dict | None:
    """For a CPU bundle of another architecture, what this host can check in its place: the
    same .onnx files in the host's onnxruntime, or the same ONNX programs compiled by the same
    TVM pipeline and schedule rules for the host CPU. None where nothing stands in (GPU targets)."""
    from ..runtime.machine import host_arch

    if target.get("device") != "cpu" or target.get("arch") == host_arch():
        return None
    if target["backend"] == "onnxruntime":
        return {"target": {**target, "arch": host_arch(), "providers": ["CPUExecutionProvider"]},
                "what": "HOST PROXY: the bundle's own .onnx files run by this host's onnxruntime CPU provider, "
                        f"not on {target['arch']}"}
    if target["backend"] == "tvm":
        tvm_target = {k: v for k, v in target["tvm"].items() if k not in ("mtriple", "mattr", "mcpu")}
        return {"target": {**target, "arch": host_arch(), "tvm": tvm_target, "cc": None},
                "what": f"HOST PROXY: the same ONNX programs compiled by the same TVM pipeline and hand-written "
                        f"schedule rules for this host ({tvm_target}), not the bundle's {target['arch']} libraries"}
    return None


def _proxy_runners(model: Model, proxy: dict, root: Path, entries: dict, infer_batch: int) -> dict:
    target = proxy["target"]
    if target["backend"] == "onnxruntime":
        return {name: load_program(root / e["file"], target, e["file"], e) for name, e in entries.items()}
    from .onnx_emit import to_onnx
    from .tvm_build import compile_onnx

    work = Path(tempfile.mkdtemp(prefix="ffcompile-proxy-"))
    runners = {}
    try:
        for name, e in entries.items():
            program = build_program(model, name, model.training.batch_size if is_train_program(name) else infer_batch)
            lib = compile_onnx(to_onnx(program, fuse=False), target["tvm"], work / f"{name}.so")
            runners[name] = load_program(lib, target, f"host proxy of {e['file']}", e)
    finally:  # a loaded library stays mapped after its file is removed
        shutil.rmtree(work, ignore_errors=True)
    return runners
