"""Loading and using a bundle on a device: inference, evaluation, fine-tuning. Needs numpy,
safetensors and the target's runtime (onnxruntime), never torch.

    bundle = load_bundle("bundles/small-x86")
    bundle.predict(x)                      # [N] int64, goodness readout
    bundle.evaluate(x, y, "softmax")       # error and latency
    bundle.finetune(x, y, epochs=2, out_dir="bundles/small-x86.finetune")
    bundle.with_weights("bundles/small-x86.finetune/checkpoint.safetensors").evaluate(x, y)

A loaded bundle's files have all been checked against the manifest's sha256; nothing is ever
written into the bundle directory.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..contract.checkpoint import CHECKPOINT, Checkpoint, load_checkpoint
from ..contract.manifest import OPTIMIZER, WEIGHTS, BundleError, read_manifest, verify_files
from ..contract.weights import check_tensors, read_tensors
from ..core.errors import FFCompileError
from ..core.family import READOUT_PROGRAMS
from ..core.spec import Model, Training, model_from_dict
from ..loop.evaluate import predict as predict_batched
from .inputs import as_images, as_labels
from .loaders import Runnable, load_program, program_files
from .machine import check_runs_here

@dataclass(frozen=True)
class Evaluation:
    readout: str
    examples: int
    error_percent: float
    batch: int
    median_batch_ms: float  # wall time of one compiled program call, median over batches
    examples_per_second: float

    @property
    def accuracy_percent(self) -> float:
        return 100.0 - self.error_percent


@dataclass
class Bundle:
    path: Path
    manifest: dict
    model: Model
    target: dict
    programs: dict[str, Runnable]
    params: dict[str, np.ndarray]
    state: dict[str, np.ndarray]
    epoch: int  # epochs behind the weights in use
    step: int  # optimizer steps behind them
    weights_from: str  # the file the weights in use came from
    # the inference programs in the bundle's reduced dtype (weights inside), by program name
    reduced: dict[str, Runnable] = dataclasses.field(default_factory=dict)

    @property
    def dtype(self) -> str:
        """The dtype inference runs in by default: the reduced one where the bundle has it."""
        return self.manifest.get("reduced_precision", {}).get("dtype", "float32")

    @property
    def dtypes(self) -> list[str]:
        return ["float32"] + ([self.dtype] if self.reduced else [])

    @property
    def readouts(self) -> list[str]:
        return [r for r, program in READOUT_PROGRAMS.items() if program in self.programs]

    def signature(self, program: str) -> dict:
        return self.manifest["programs"][program]

    def program_params(self, program: str) -> dict[str, np.ndarray]:
        names = {v["name"] for v in self.signature(program)["inputs"]}
        return {k: v for k, v in self.params.items() if k in names}

    def _readout_program(self, readout: str, dtype: str) -> tuple[Runnable, dict]:
        """The program that runs ``readout`` in ``dtype`` and the weights to feed it."""
        if readout not in READOUT_PROGRAMS:
            raise FFCompileError(f"unknown readout {readout!r} (known: {', '.join(READOUT_PROGRAMS)})")
        name = READOUT_PROGRAMS[readout]
        if name not in self.programs:
            raise FFCompileError(f"bundle {self.path} has no {readout} readout (it has: {', '.join(self.readouts)})")
        if dtype == "float32":
            return self.programs[name], self.program_params(name)
        if dtype not in self.dtypes:
            raise FFCompileError(f"bundle {self.path} has no {dtype} programs (it has: {', '.join(self.dtypes)}); "
                                 f"build one with `ffcompile build ... --dtype {dtype}`")
        if self.weights_from != str(self.path / WEIGHTS):
            raise FFCompileError(f"the {dtype} programs of {self.path} hold the bundle's own weights, not those of "
                                 f"{self.weights_from}: run them in float32 (--dtype float32), or quantize the new "
                                 f"weights with `ffcompile build RUN_DIR --dtype {dtype}`")
        return self.reduced[name], {}

    def predict(self, x, readout: str = "goodness", dtype: str | None = None) -> np.ndarray:
        """Predicted class per row of ``x`` [N, input size]; ``dtype``: float32 or the bundle's
        reduced dtype (default: the bundle's ``dtype``)."""
        return self._predict(x, readout, dtype)[0]

    def evaluate(self, x, y, readout: str = "goodness", dtype: str | None = None) -> Evaluation:
        images = as_images(x, self.model.input.size)
        labels = as_labels(y, len(images), self.model.input.label.classes)
        predictions, times = self._predict(images, readout, dtype)
        batch = self.manifest["batch"]["infer"]
        median = statistics.median(times)
        return Evaluation(readout=readout, examples=len(images),
                          error_percent=float(np.mean(predictions != labels) * 100.0), batch=batch,
                          median_batch_ms=median * 1e3, examples_per_second=batch / median if median > 0 else float("inf"))

    def perplexity(self, x, y) -> float:
        """Next-character models: exp(mean -log p(true next character)) with ``infer_softmax``."""
        from ..loop.nextchar import batched, perplexity

        if "infer_softmax" not in self.programs:
            raise FFCompileError(f"bundle {self.path} has no infer_softmax program")
        images = as_images(x, self.model.input.size)
        labels = as_labels(y, len(images), self.model.input.label.classes)
        run = batched(self.programs["infer_softmax"].run, self.manifest["batch"]["infer"])
        return perplexity(run, self.program_params("infer_softmax"), images, labels)

    def generate(self, prompt: str, length: int, seed: int = 0, greedy: bool = False) -> str:
        """Next-character models: ``length`` characters continuing ``prompt`` (cleaned to the
        alphabet; its last K characters are the first context), drawn with ``infer_softmax``."""
        from ..data.text import ALPHABET, clean, decode, encode, one_hot
        from ..loop.nextchar import batched, generate

        if not self.model.family.predicts_characters or "infer_softmax" not in self.programs:
            raise FFCompileError(f"bundle {self.path}: model {self.model.name!r} is not a next-character model")
        if length < 0:
            raise FFCompileError(f"length must be >= 0, got {length}")
        symbols = self.model.input.label.classes
        chars = self.model.input.size // symbols
        text = clean(prompt)
        if symbols != len(ALPHABET) or len(text) < chars:
            raise FFCompileError(f"the prompt needs at least {chars} characters of {ALPHABET!r} after cleaning, "
                                 f"got {len(text)} ({text!r})")
        context = one_hot(encode(text[-chars:])[None, :])
        run = batched(self.programs["infer_softmax"].run, self.manifest["batch"]["infer"])
        codes, _ = generate(run, self.program_params("infer_softmax"), context, length, symbols,
                            np.random.default_rng(seed), greedy)
        return decode(codes[0])

    def _predict(self, x, readout: str, dtype: str | None) -> tuple[np.ndarray, list[float]]:
        program, params = self._readout_program(readout, self.dtype if dtype is None else dtype)
        images = as_images(x, self.model.input.size)
        times = []

        def timed_run(feeds):
            started = time.perf_counter()
            out = program.run(feeds)
            times.append(time.perf_counter() - started)
            return out

        predictions = predict_batched(timed_run, params, images, self.manifest["batch"]["infer"])
        return predictions, times

    def finetune(self, x, y, epochs: int, out_dir, resume: bool = False, progress: bool = True, val=None,
                 seed: int | None = None, log=print) -> Checkpoint:
        """FF training driven by the compiled ``train_step``; see ``ffcompile.runtime.finetune``."""
        from .finetune import finetune

        return finetune(self, x, y, epochs, out_dir, resume=resume, progress=progress, val=val, seed=seed, log=log)

    def with_weights(self, checkpoint) -> "Bundle":
        """This bundle's programs with the weights (and optimizer state) of a checkpoint, e.g. a
        fine-tuning run's ``checkpoint.safetensors`` (or the folder holding it)."""
        path = Path(checkpoint)
        if path.is_dir():
            path = path / CHECKPOINT
        ckpt = load_checkpoint(path)
        if not same_network(ckpt.model, self.model):
            raise FFCompileError(f"{path}: checkpoint of model {ckpt.model.name!r} does not fit bundle {self.path} "
                                 f"(model {self.model.name!r}): the networks or learning rules differ")
        return self.with_params(ckpt.params, ckpt.state, ckpt.epoch, ckpt.step, str(path))

    def with_params(self, params, state, epoch: int, step: int, weights_from: str = "(in memory)") -> "Bundle":
        return dataclasses.replace(self, params=params, state=state, epoch=epoch, step=step, weights_from=weights_from)


def bundle_bytes(root: Path, manifest: dict) -> dict:
    """The bundle's size on disk, and what inference alone needs in each dtype it has: the
    inference programs, plus the weights file for float32 (reduced programs hold their weights)."""
    size = {rel: (Path(root) / rel).stat().st_size for rel in manifest["files"]}
    infer = [e["file"] for name, e in manifest["programs"].items() if name in READOUT_PROGRAMS.values()]
    out = {"total": sum(size.values()), "inference_float32": sum(size[f] for f in infer) + size[WEIGHTS]}
    reduced = manifest.get("reduced_precision")
    if reduced:
        out[f"inference_{reduced['dtype']}"] = sum(size[e["file"]] for e in reduced["programs"].values())
    return out


def same_network(a: Model, b: Model) -> bool:
    """Same architecture and learning rule; the training section (batch size, epochs) may differ."""
    return dataclasses.replace(a, training=Training()) == dataclasses.replace(b, training=Training())


def _check_batches(root: Path, manifest: dict, model: Model) -> None:
    """The manifest's batch sizes, the model's and each program's static batch agree (the loops
    cut batches by the manifest; a program of another batch would fail in the middle of a run)."""
    from ..core.family import is_train_program

    batch = manifest["batch"]
    if batch["train"] != model.training.batch_size:
        raise BundleError(f"bundle {root}: batch.train {batch['train']} is not the model's training.batch_size "
                          f"{model.training.batch_size}")
    for name, entry in manifest["programs"].items():
        want = batch["train"] if is_train_program(name) else batch["infer"]
        for v in entry["inputs"]:
            if v["name"] == "x" and (not v["shape"] or v["shape"][0] != want):
                raise BundleError(f"bundle {root}: program {name} takes a batch of {v['shape'][:1]}, the manifest's "
                                  f"batch is {want}")


def load_bundle(path, trust=None, digest: str | None = None) -> Bundle:
    """Load a bundle after checking its digest (with ``trust``, a public key file: its signature
    by that key; with ``digest``, that it is this bundle), format, every file's sha256, and that
    this machine can run its target. Nothing is opened or loaded before these checks."""
    root = Path(path)
    manifest = read_manifest(root, trust, digest)
    verify_files(root, manifest)
    model = model_from_dict(manifest["model"], source=f"{root / 'manifest.json'} (model)")
    target = manifest["target"]
    check_runs_here(target)
    params, _ = read_tensors(root / WEIGHTS)
    state, meta = read_tensors(root / OPTIMIZER)
    check_tensors(f"bundle {root}", model, params, state)
    try:
        epoch, step = int(meta["epoch"]), int(meta["step"])
    except (KeyError, ValueError):
        raise BundleError(f"{root / OPTIMIZER}: metadata lacks the training position (epoch, step)") from None
    _check_batches(root, manifest, model)
    for name, entry in [*manifest["programs"].items(), *manifest.get("reduced_precision", {}).get("programs", {}).items()]:
        unlisted = [rel for rel in program_files(target["backend"], entry["file"]) if rel not in manifest["files"]]
        if unlisted:
            raise BundleError(f"bundle {root}: program {name} reads {', '.join(unlisted)}, which is not among "
                              "the bundle's hashed files")
    def load(entries: dict) -> dict[str, Runnable]:
        return {name: load_program(root / e["file"], target, f"{root.name}/{e['file']}", e) for name, e in entries.items()}

    return Bundle(path=root, manifest=manifest, model=model, target=target, programs=load(manifest["programs"]),
                  params=params, state=state, epoch=epoch, step=step, weights_from=str(root / WEIGHTS),
                  reduced=load(manifest.get("reduced_precision", {}).get("programs", {})))
