"""The ``ffcompile`` command line. User errors print one line and exit non-zero; no tracebacks."""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import click

from ..contract.checkpoint import CHECKPOINT, METRICS
from ..core.errors import FFCompileError
from ..data.datasets import data_dir_help
from ..loop.divergence import RunInterrupted


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except RunInterrupted as e:  # a training run says what it saved
            click.echo(str(e), err=True)
            sys.exit(130)
        except FFCompileError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort, SystemExit):
            raise
        except Exception:  # not a user error: a bug, shown in full
            traceback.print_exc()
            click.echo("this is a bug in ffcompile, not in your input; please report it with the command line "
                       "and the traceback above", err=True)
            sys.exit(3)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ffcompile")
def main():
    """ffcompile: train Forward-Forward networks, compile them (inference AND training steps) to
    ONNX Runtime and TVM, verify them against the PyTorch reference, and fine-tune on device.

    \b
    Typical flow:
      ffcompile train models/mnist-small.toml --out runs/small
      ffcompile eval runs/small --readout goodness
    """


DATA_DIR = click.option("--data-dir", type=click.Path(path_type=Path), default=None, help=data_dir_help())
DTYPE = click.option("--dtype", type=click.Choice(["float32", "float16", "int8"]), default="float32", show_default=True,
                     help="Precision of the inference programs (int8: calibrated on training rows).")
JSON = click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout (messages stay on stderr).")
PROGRESS = click.option("--progress/--no-progress", default=None,
                        help="Progress bars on stderr (default: on when stderr is a terminal).")


def show_progress(progress: bool | None, as_json: bool = False) -> bool:
    return (sys.stderr.isatty() if progress is None else progress) and not as_json


def report(as_json: bool, result: dict, text: str) -> None:
    """A command's result: one JSON object on stdout with --json, else ``text``."""
    click.echo(json.dumps(result) if as_json else text)


def _echo(msg: str) -> None:
    click.echo(msg, err=True)


def load_split(model, data_dir, split: str):
    """(source, x, y) of the model's ``input.dataset``; pass the source back as data_dir for more splits."""
    from ..data.datasets import load_model_split

    return load_model_split(model, data_dir, split)


@main.command()
@click.argument("model_path", metavar="MODEL.toml", type=click.Path(path_type=Path))
@DATA_DIR
@click.option("--epochs", type=int, default=None, help="Epochs to train in total (default: the spec's training.epochs).")
@click.option("-o", "--out", "run_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help=f"Run directory: {CHECKPOINT}, {METRICS}, curves.png, receptive_fields.png "
                   "(and hybrid_negatives.png for hybrid-negative models).")
@click.option("--resume", is_flag=True, help=f"Continue from RUN_DIR/{CHECKPOINT} (bit-identical continuation).")
@click.option("--device", default="cpu", show_default=True, help="torch device for the reference backend (cpu, cuda).")
@click.option("--backend", type=click.Choice(["torch", "onnxruntime", "tvm"]), default=None,
              help="What runs the train step: torch (the PyTorch reference; GPUs, next-character models), "
                   "onnxruntime or tvm (the step compiled for this CPU, parity-checked against torch before "
                   "training). Default: the fastest available here: tvm on x86-64 CPUs, else onnxruntime, "
                   "torch with --device cuda. Resume continues bit-identically on the same backend.")
@click.option("--split", type=click.Choice(["train", "trainval"]), default="train", show_default=True,
              help="train = the training part (MNIST: 50k as in the paper; CIFAR-10: 45k; text: the paper's 248 strings), validating on the held-out part each epoch; trainval = both.")
@click.option("--limit", type=int, default=None, help="Use only the first N training examples (quick runs).")
@click.option("--eval-every", type=int, default=1, show_default=True, help="Validate every N epochs (and at the end).")
@PROGRESS
@JSON
@click.option("--nproc", type=click.IntRange(min=1), default=None,
              help="Train in N processes on this machine (launches torchrun; gloo on CPU, NCCL on GPUs), split "
                   "as --parallel says; all compute the one-process step. Under torchrun (several machines: see "
                   "docs/distributed.md) every process joins the job by itself.")
@click.option("--parallel", type=click.Choice(["data", "pipeline"]), default="data", show_default=True,
              help="How --nproc N (or torchrun) splits training: data = each process takes 1/N of every batch; "
                   "pipeline = each process owns a contiguous range of layers (at most one process per layer) "
                   "and micro-batches stream through them. Both compute the one-process step "
                   "(docs/distributed.md).")
@click.pass_context
def train(ctx, model_path, data_dir, epochs, run_dir, resume, device, backend, split, limit, eval_every, progress,
          as_json, nproc, parallel):
    """Train MODEL.toml (every layer learns every minibatch from its own local objective) on the
    fastest verified backend, or the one --backend names."""
    from ..compiler.compiled_train import check_backend, compiled_steps, default_backend
    from ..reference.plots import first_layer_images, hybrid_examples, learning_curves, receptive_fields
    from ..core.spec import load_model
    from ..reference.train import Dataset, train as run_training

    if nproc is not None:
        if parallel == "pipeline" and nproc > 1:  # refused here in one line, not by every process of the job
            from ..reference.distributed import check_pipeline

            check_pipeline(load_model(model_path), nproc)
        sys.exit(_launch_torchrun(ctx, nproc))
    progress = show_progress(progress, as_json)
    model = load_model(model_path)
    make_step, writer, say = None, True, _echo
    if _distributed_job():
        from ..reference import distributed

        _check_device(device)
        device = distributed.local_device(device)
        rank, world = distributed.start(device)
        writer = rank == 0
        if not writer:
            say, progress = (lambda _msg: None), False
        if parallel == "pipeline":
            step_fn = distributed.PipelineStep(model, device, rank, world)
            make_step = lambda _ckpt: step_fn
            say(f"layer-pipelined: {world} processes, layers {distributed.describe_stages(model, world)}, "
                f"{len(step_fn.micro)} micro-batches of every batch")
        else:
            make_step = lambda _ckpt: distributed.DataParallelStep(model, device, rank, world)
            say(f"data-parallel: {world} processes, {model.training.batch_size // world}+ rows of every batch each")
    if not resume and (run_dir / CHECKPOINT).exists():
        raise FFCompileError(f"{run_dir / CHECKPOINT} exists: pass --resume to continue it, or choose another --out")
    epochs = model.training.epochs if epochs is None else epochs
    if epochs < 0:
        raise FFCompileError(f"--epochs must be >= 0, got {epochs}")
    if epochs == 0 and not resume:
        say("--epochs 0: nothing to train; nothing written")
        return
    if eval_every < 1:
        raise FFCompileError(f"--eval-every must be >= 1, got {eval_every}")
    backend = backend or ("torch" if make_step else default_backend(model, device))
    if make_step and backend != "torch":
        raise FFCompileError(f"--backend {backend}: training on several processes runs the torch reference; "
                             "use --backend torch")
    check_backend(model, backend, device)
    _check_device(device)
    source, x, y = load_split(model, data_dir, split)
    if limit is not None:
        _check_limit(model, limit)
        x, y = x[:limit], y[:limit]
    check_one_batch(model, len(x))
    x_val = y_val = None
    if split == "train":
        _, x_val, y_val = load_split(model, source, "val")
    say(f"data: {source.describe()}; training on {len(x)} examples ({split})"
          + (f", validating on {len(x_val)}" if x_val is not None else ""))
    data = Dataset(x, y, x_val, y_val, source.describe())
    if backend != "torch":
        make_step = compiled_steps(model, backend, data, say)
    say(f"backend: {backend}")
    try:
        ckpt = run_training(model, data, run_dir, epochs, resume=resume, device=device, progress=progress,
                            eval_every=eval_every, log=say, make_step=make_step, writer=writer, backend=backend)
    finally:
        if _distributed_job():  # leaving the job before exit: a process group torn down at exit can abort
            from ..reference import distributed

            distributed.stop()
    if not writer:
        return
    history = json.loads((run_dir / METRICS).read_text())["epochs"] if (run_dir / METRICS).exists() else []
    if history:
        learning_curves(history, run_dir / "curves.png", f"{model.name} ({source.describe()})")
    first = model.layers[0]
    label_note = " (label in the first pixels)" if model.input.label.kind == "first_pixels" else ""
    if model.family.predicts_characters:
        label_note = "\n(rows: the context's characters, oldest first; columns: a-z, space , ; .)"
    receptive_fields(first_layer_images(model, ckpt.params[f"{first.name}.weight"]), model.input.image_shape,
                     run_dir / "receptive_fields.png", title=f"{model.name}: first-layer receptive fields{label_note}")
    wrote = f"{CHECKPOINT}, {METRICS}, curves.png, receptive_fields.png"
    if model.negatives.kind == "hybrid_image":
        hybrid_examples(model, x, y, run_dir / "hybrid_negatives.png", seed=model.training.seed)
        wrote += ", hybrid_negatives.png"
    last = history[-1] if history else {}
    report(as_json, {"run": str(run_dir), "model": model.name, "backend": backend, "epochs": ckpt.epoch,
                     "step": ckpt.step, "val_error_percent": {k.split(".", 1)[1]: v for k, v in last.items()
                                                              if k.startswith("val_error.")},
                     "files": wrote.split(", ")}, f"wrote {run_dir}/{wrote}")


def _check_device(device: str) -> None:
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        kind = None
    if kind not in ("cpu", "cuda"):
        raise FFCompileError(f"--device {device!r}: must be cpu, cuda or cuda:N")
    if kind == "cuda" and not torch.cuda.is_available():
        raise FFCompileError(f"--device {device}: torch sees no CUDA GPU on this machine")


def check_batch(batch: int, option: str) -> None:
    from ..core.spec_limits import MAX_BATCH

    if not 0 < batch <= MAX_BATCH:
        raise FFCompileError(f"{option} must be in 1..{MAX_BATCH}, got {batch} (a program holds a whole batch at once)")


def check_one_batch(model, examples: int) -> None:
    if examples < model.training.batch_size:
        raise FFCompileError(f"{examples} training examples is less than one batch of {model.training.batch_size} "
                             "(training.batch_size)")


def _distributed_job() -> bool:
    import os

    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _launch_torchrun(ctx, nproc: int) -> int:
    """Runs this same ``train`` command in ``nproc`` processes under torchrun; returns its exit code.
    torchrun runs inside this process, quietened, so that a failed job ends with its processes' own
    one-line errors rather than torchrun's log lines and traceback."""
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = [str(ctx.params["model_path"])]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if isinstance(param, click.Argument) or param.name == "nproc" or value is None:
            continue
        if param.is_flag:
            flag = param.opts[0] if value else (param.secondary_opts or [None])[0]
            args += [flag] if flag else []
        else:
            args += [param.opts[0], str(value)]
    launch = ["--standalone", f"--nproc-per-node={nproc}", "-m", "ffcompile", "train", *args]
    _echo(f"launching {nproc} processes: torchrun {' '.join(launch)}")
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(get_args_parser().parse_args(launch))
    except ChildFailedError as e:
        codes = [failure.exitcode for failure in e.failures.values()]
        return next((code for code in codes if code > 0), 1)
    return 0


def _check_limit(model, limit: int) -> None:
    if limit <= 0:
        raise FFCompileError(f"--limit must be positive, got {limit}")
    if model.family.predicts_characters:
        from ..data.text import PREDICTIONS
        from ..loop.nextchar import check_whole_strings

        check_whole_strings(limit, PREDICTIONS)
    if limit < model.training.batch_size:
        raise FFCompileError(f"--limit {limit} is less than one batch of {model.training.batch_size} "
                             "(training.batch_size)")


@main.command("eval")
@click.argument("run_dir", type=click.Path(path_type=Path))
@DATA_DIR
@click.option("--readout", type=click.Choice(["goodness", "softmax", "all"]), default="all", show_default=True,
              help="Which readout to score (all: every readout the model has).")
@click.option("--split", type=click.Choice(["test", "val", "train"]), default="test", show_default=True,
              help="Which part of the data set (val: held out from the training file, never tested on).")
@click.option("--device", default="cpu", show_default=True, help="torch device of the reference backend (cpu, cuda).")
@click.option("--batch", type=int, default=100, show_default=True, help="Rows per evaluation batch.")
@PROGRESS
@JSON
def eval_cmd(run_dir, data_dir, readout, split, device, batch, progress, as_json):
    """Test error of a trained run with the goodness readout (every label scored in one batched
    pass) and/or the one-pass softmax readout."""
    from ..contract.checkpoint import load_checkpoint
    from ..reference.train import evaluate_params, readouts_of

    _check_device(device)
    check_batch(batch, "--batch")

    path = run_dir / CHECKPOINT if run_dir.is_dir() else run_dir
    ckpt = load_checkpoint(path)
    source, x, y = load_split(ckpt.model, data_dir, split)
    readouts = readouts_of(ckpt.model) if readout == "all" else [readout]
    result = {"run": str(run_dir), "model": ckpt.model.name, "epochs_trained": ckpt.epoch, "data": source.describe(),
              "split": split, "examples": int(len(x)), "error_percent": {}}
    for r in readouts:
        if r not in readouts_of(ckpt.model):
            raise FFCompileError(f"model {ckpt.model.name!r} has no {r} readout")
        result["error_percent"][r] = round(evaluate_params(ckpt.model, ckpt.params, x, y, r, batch, device,
                                                             progress=show_progress(progress, as_json)), 4)
    if ckpt.model.family.predicts_characters:
        from ..reference.train import sequence_perplexity

        result["perplexity"] = round(sequence_perplexity(ckpt.model, ckpt.params, x, y, batch, device), 4)
    if as_json:
        click.echo(json.dumps(result))
    else:
        for r, err in result["error_percent"].items():
            click.echo(f"{ckpt.model.name} {split} error ({r} readout): {err:.2f}% of {len(x)}")
        if "perplexity" in result:
            click.echo(f"{ckpt.model.name} {split} perplexity of the next character: {result['perplexity']:.3f}")


@main.group()
def data():
    """Get and check data sets (MNIST, CIFAR-10; the text corpus is built in)."""


@data.command("download")
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
@click.option("--dataset", type=click.Choice(["mnist", "cifar10"]), default="mnist", show_default=True,
              help="Which data set to download.")
@JSON
def data_download(dest, dataset, as_json):
    """Download a data set into DEST. mnist: from the public mirrors, verifying every SHA256.
    cifar10: the official binary archive, verifying its MD5 and size, keeping only the six batch
    files (pass DEST as --data-dir or $FFCOMPILE_CIFAR_DIR)."""
    if dataset == "cifar10":
        from ..data.cifar import download_cifar10

        folder = download_cifar10(dest, log=_echo)
        report(as_json, {"dataset": dataset, "path": str(folder)}, f"ok: CIFAR-10 binary files in {folder}")
        return
    from ..data import download_mnist

    source = download_mnist(dest, progress=show_progress(None, as_json), log=_echo)
    report(as_json, {"dataset": dataset, "path": str(dest), "data": source.describe()}, f"ok: {source.describe()}")


@data.command("verify")
@DATA_DIR
@JSON
def data_verify(data_dir, as_json):
    """Check every MNIST file's checksum."""
    from ..data import resolve_data_dir

    source = resolve_data_dir(data_dir)
    source.verify()
    report(as_json, {"ok": True, "data": source.describe()}, f"ok: {source.describe()}")


@main.command()
@click.argument("source", metavar="MODEL.toml|NAME|RUN|BUNDLE", type=click.Path(path_type=Path))
@click.option("--batch", type=int, default=None, help="Static batch of the programs (default: training.batch_size).")
@JSON
def inspect(source, batch, as_json):
    """Validate a model spec (a file or a shipped model's name) and print its IR (JSON) and a
    summary of each program a bundle of it carries. For a trained run or a bundle: the model it
    holds and where training stands."""
    from ..lowering import build_program, bundle_programs

    model, about = _inspected(source)
    batch = batch or model.training.batch_size
    check_batch(batch, "--batch")
    programs = {}
    for name in bundle_programs(model):
        program = build_program(model, name, batch)
        sig = program.signature()
        programs[name] = {"ops": len(program.nodes), "inputs": len(sig["inputs"]), "outputs": len(sig["outputs"])}
    if as_json:
        click.echo(json.dumps({**about, "model": model.to_json(), "batch": batch, "programs": programs}))
        return
    click.echo(model.dumps())
    for key, value in about.items():
        click.echo(f"{key}: {value}")
    for name, p in programs.items():
        click.echo(f"{name}: {p['ops']} ops, {p['inputs']} inputs, {p['outputs']} outputs")


def _inspected(source: Path):
    """(model, facts) of a spec, a run folder or checkpoint, or a bundle."""
    from ..contract.checkpoint import load_checkpoint
    from ..contract.manifest import is_bundle_dir, read_manifest, verify_files
    from ..core.spec import load_model, model_from_dict

    if source.is_dir() and is_bundle_dir(source):
        manifest = read_manifest(source)
        verify_files(source, manifest)
        model = model_from_dict(manifest["model"], source=f"{source / 'manifest.json'} (model)")
        return model, {"kind": "bundle", "target": manifest["target"]["name"], "programs_in_bundle": list(manifest["programs"])}
    checkpoint = source / CHECKPOINT if source.is_dir() else source
    if checkpoint.suffix == ".safetensors" or source.is_dir():
        ckpt = load_checkpoint(checkpoint)
        return ckpt.model, {"kind": "run", "epochs_trained": ckpt.epoch, "steps": ckpt.step}
    return load_model(source), {"kind": "spec"}
