"""CLI commands for bundles: ``build``, ``run``, ``verify``, ``finetune``, ``generate``, ``targets``.

Registered on ``ffcompile.cli.main`` when that module is imported. ``run``, ``finetune`` and
``generate`` use only the torch-free runtime; ``build`` and ``verify`` need the compiler side
(torch reference).
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np

from ..contract.checkpoint import CHECKPOINT, METRICS
from ..core.errors import FFCompileError
from .main import DATA_DIR, DTYPE, JSON, PROGRESS, _check_limit, _echo, load_split, main, report, show_progress


@main.command()
@JSON
def targets(as_json):
    """List the compilation targets (targets/*.toml, plus $FFCOMPILE_TARGETS folders)."""
    from ..compiler.targets import known_targets

    rows = [(t.name, t.backend, t.device, t.arch, t.description) for t in known_targets()]
    if as_json:
        keys = ("name", "backend", "device", "arch", "description")
        click.echo(json.dumps({"targets": [dict(zip(keys, r)) for r in rows]}))
        return
    header = ("name", "backend", "device", "arch", "description")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(4)]
    for row in [header, *rows]:
        click.echo("  ".join(str(v).ljust(w) for v, w in zip(row[:4], widths)) + "  " + row[4])


def trust_options(command):
    """--trust and --digest: what a bundle must prove before anything in it is loaded."""
    command = click.option("--digest", default=None, metavar="sha256:HEX",
                           help="Require this bundle digest (as `ffcompile build` prints it).")(command)
    return click.option("--trust", type=click.Path(dir_okay=False, path_type=Path), default=None, metavar="KEY.pub",
                        help="Require the bundle to be signed by this public key (`ffcompile keygen`).")(command)


@main.command()
@JSON
def models(as_json):
    """List the shipped model specs (usable by name wherever a MODEL.toml is asked for)."""
    from ..core.shipped import spec_dir
    from ..core.spec import load_model

    rows = []
    for path in sorted(spec_dir("models").glob("*.toml")):
        model = load_model(path)
        comment = [line[1:].strip() for line in path.read_text().splitlines()[:6] if line.startswith("#")]
        size = " x ".join(str(layer.size) for layer in model.layers)
        rows.append({"name": model.name, "path": str(path), "family": model.family.value, "layers": size,
                     "epochs": model.training.epochs, "about": " ".join(comment)})
    if as_json:
        click.echo(json.dumps({"models": rows}))
        return
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        about = r["about"] if len(r["about"]) <= 90 else r["about"][:87] + "..."
        click.echo(f"{r['name'].ljust(width)}  {r['family']:<14}  {r['layers']:<26}  {about}")


@main.command()
@click.argument("key_path", metavar="KEY", type=click.Path(dir_okay=False, path_type=Path))
@JSON
def keygen(key_path, as_json):
    """Create an ed25519 signing key pair: KEY (private, owner-only) and KEY.pub (public; give it to
    devices as --trust). Sign bundles with `ffcompile build ... --sign KEY`."""
    from ..contract.integrity import keygen as make_keys

    private, public, fingerprint = make_keys(key_path)
    report(as_json, {"private": str(private), "public": str(public), "key": fingerprint},
           f"wrote {private} (private: keep it secret) and {public} (public); key {fingerprint}")


@main.command()
@click.argument("source", metavar="RUN_DIR|CHECKPOINT|MODEL.toml", type=click.Path(path_type=Path))
@click.option("--target", "target_name", default="x86-cpu", show_default=True,
              help="Target name (see `ffcompile targets`) or path to a target .toml.")
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Bundle directory to write.")
@click.option("--batch", type=int, default=None, help="Static batch of train_step (default: the model's training.batch_size).")
@click.option("--infer-batch", type=int, default=100, show_default=True, help="Static batch of the inference programs.")
@click.option("--verify-steps", type=int, default=100, show_default=True,
              help="Training-trajectory steps checked against the reference at build time (0: programs only).")
@DATA_DIR
@click.option("--seed", type=int, default=None, help="Seed of the initial weights when SOURCE is a model spec.")
@PROGRESS
@click.option("--sign", "sign_key", type=click.Path(dir_okay=False, path_type=Path), default=None, metavar="KEY",
              help="Sign the bundle digest with this private key (`ffcompile keygen`).")
@DTYPE
@click.option("--accuracy-budget", type=float, default=0.5, show_default=True, metavar="POINTS",
              help="With --dtype: the most validation error (percentage points) the reduced programs may add "
                   "over float32; a bundle over it is refused.")
@click.option("--force", is_flag=True, help="With --dtype: write the bundle even when it is over --accuracy-budget.")
@JSON
def build(source, target_name, out_dir, batch, infer_batch, verify_steps, data_dir, seed, progress, sign_key, dtype,
          accuracy_budget, force, as_json):
    """Compile a trained run (or a model spec, with fresh weights) into a self-contained bundle:
    train_step + inference programs, weights, optimizer state, manifest with checksums, and the
    parity report of the compiled programs against the PyTorch reference. With --dtype int8 or
    float16 the bundle also holds the inference programs in that dtype (weights inside, int8
    calibrated on training rows), checked against the reference and the accuracy budget on
    validation rows; they are what `run` uses by default, while fine-tuning stays float32."""
    from ..compiler.build import build_bundle

    if verify_steps < 0:
        raise FFCompileError(f"--verify-steps must be >= 0, got {verify_steps}")
    manifest = build_bundle(source, target_name, out_dir, batch=batch, infer_batch=infer_batch,
                            verify_steps=verify_steps, data_dir=data_dir, seed=seed,
                            progress=show_progress(progress, as_json), log=_echo, sign_key=sign_key, dtype=dtype,
                            accuracy_budget=accuracy_budget, force=force)
    parity = {True: "passed", None: "not run here", False: "FAILED"}[manifest["parity_passed"]]
    report(as_json, {"bundle": str(out_dir), "target": manifest["target"]["name"], "programs": list(manifest["programs"]),
                     "dtype": dtype, "parity": parity, "digest": manifest["digest"]},
           f"wrote bundle {out_dir}: {', '.join(manifest['programs'])} for {manifest['target']['name']} (parity {parity})\n"
           f"bundle digest {manifest['digest']}")


def _load_data(model, data_dir, split: str, input_path: Path | None, labels_path: Path | None,
               input_scale: float | None = None):
    """(x, y or None, description) from the model's data set or from .npy files."""
    from ..runtime.inputs import read_npy, scaled_images

    if input_path is None:
        if labels_path is not None or input_scale is not None:
            raise FFCompileError("--labels and --input-scale need --input")
        source, x, y = load_split(model, data_dir, split)
        return x, y, f"{source.describe()}, {split} split"
    x = scaled_images(read_npy(input_path, "--input"), input_scale)
    y = read_npy(labels_path, "--labels") if labels_path is not None else None
    return x, y, str(input_path)


@main.command()
@click.argument("bundle_dir", metavar="BUNDLE", type=click.Path(path_type=Path))
@DATA_DIR
@click.option("--split", type=click.Choice(["test", "val", "train"]), default="test", show_default=True,
              help="Which part of the data set (val: held out from the training file, never tested on).")
@click.option("--input", "input_path", type=click.Path(path_type=Path), default=None,
              help="Images as a .npy array [N, 784] instead of MNIST (predictions only, unless --labels).")
@click.option("--labels", "labels_path", type=click.Path(path_type=Path), default=None, help="Labels .npy [N] for --input.")
@click.option("--input-scale", type=float, default=None,
              help="Divide --input by this first (255 for 0..255 images); pixels must end up in [0, 1].")
@click.option("--readout", type=click.Choice(["goodness", "softmax", "all"]), default="all", show_default=True,
              help="Which readout to run (all: every readout the bundle has).")
@click.option("--weights", "weights", type=click.Path(path_type=Path), default=None,
              help=f"Use a checkpoint's weights (e.g. BUNDLE.finetune/{CHECKPOINT}) instead of the bundle's.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "int8"]), default=None,
              help="Run the inference programs in this dtype (default: the bundle's, see `build --dtype`).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@trust_options
def run(bundle_dir, data_dir, split, input_path, labels_path, input_scale, readout, weights, dtype, as_json, trust,
        digest):
    """Run a bundle's inference programs: error rate and latency (median ms per batch, throughput),
    and what it cost: bundle size, inference payload per dtype, peak memory of the process."""
    from ..runtime.bundle import bundle_bytes, load_bundle
    from ..runtime.machine import peak_rss_kib

    bundle = load_bundle(bundle_dir, trust, digest)
    if weights is not None:
        bundle = bundle.with_weights(weights)
    x, y, described = _load_data(bundle.model, data_dir, split, input_path, labels_path, input_scale)
    readouts = bundle.readouts if readout == "all" else [readout]
    dtype = dtype or bundle.dtype
    result = {"bundle": str(bundle_dir), "model": bundle.model.name, "target": bundle.target["name"], "dtype": dtype,
              "weights": bundle.weights_from, "data": described, "examples": int(len(x)), "readouts": {}}
    for r in readouts:
        if y is None:
            predictions = bundle.predict(x, r, dtype)
            result["readouts"][r] = {"predictions": predictions.tolist()}
            continue
        ev = bundle.evaluate(x, y, r, dtype)
        result["readouts"][r] = {"error_percent": round(ev.error_percent, 4), "accuracy_percent": round(ev.accuracy_percent, 4),
                                 "batch": ev.batch, "median_batch_ms": round(ev.median_batch_ms, 3),
                                 "examples_per_second": round(ev.examples_per_second, 1)}
    if y is not None and bundle.model.family.predicts_characters:
        result["perplexity"] = round(bundle.perplexity(x, y), 4)
    result["cost"] = {"bundle_bytes": bundle_bytes(bundle.path, bundle.manifest),
                      "peak_rss_mib": round(peak_rss_kib() / 1024, 1),
                      "peak_rss_note": "of this process (Python, the runtime, the data), while loading and running"}
    if as_json:
        click.echo(json.dumps(result))
        return
    if "perplexity" in result:
        click.echo(f"{bundle.model.name} on {bundle.target['name']}: perplexity of the next character {result['perplexity']:.3f}")
    for r, res in result["readouts"].items():
        if "predictions" in res:
            counts = np.bincount(np.asarray(res["predictions"], np.int64), minlength=bundle.model.input.label.classes)
            click.echo(f"{bundle.model.name} ({r} readout): {len(x)} predictions; per class {counts.tolist()}")
        else:
            click.echo(f"{bundle.model.name} on {bundle.target['name']} ({r} readout, {dtype}): error {res['error_percent']:.2f}% "
                       f"of {len(x)}; {res['median_batch_ms']:.2f} ms per batch of {res['batch']} (median), "
                       f"{res['examples_per_second']:.0f} examples/s")
    click.echo(cost_line(result["cost"]))


def cost_line(cost: dict) -> str:
    size = cost["bundle_bytes"]
    payload = ", ".join(f"{k.split('_', 1)[1]} {v / 2**20:.2f} MiB" for k, v in size.items() if k.startswith("inference_"))
    return (f"cost: bundle {size['total'] / 2**20:.2f} MiB (inference needs: {payload}); "
            f"peak resident memory {cost['peak_rss_mib']:.0f} MiB")


@main.command()
@click.argument("bundle_dir", metavar="BUNDLE", type=click.Path(path_type=Path))
@DATA_DIR
@click.option("--steps", type=int, default=None, help="Training-trajectory steps (default 100; 10 with --emulate).")
@click.option("--emulate", is_flag=True,
              help="Run the aarch64 bundle on an emulated device (qemu-aarch64 + a cached sysroot, torch-free runtime "
                   "only) and compare its outputs here with the PyTorch reference.")
@click.option("--sysroot-cache", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="With --emulate: the sysroot cache folder (default $FFCOMPILE_CACHE or ~/.cache/ffcompile).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the full JSON report here.")
@click.option("--json", "as_json", is_flag=True, help="Print the full JSON report on stdout.")
@PROGRESS
@trust_options
def verify(bundle_dir, data_dir, steps, emulate, sysroot_cache, report_path, as_json, progress, trust, digest):
    """Check every compiled program against the PyTorch reference (random inputs and real data)
    and a STEPS-step training trajectory; exit 1 if any tensor is outside its tolerance."""
    from ..contract.checkpoint import write_json
    from ..reference.parity import summary_lines

    if steps is not None and steps < 0:
        raise FFCompileError(f"--steps must be >= 0, got {steps}")
    progress = show_progress(progress, as_json)
    if emulate:
        from ..emulation.verify import DEFAULT_STEPS, verify_emulated

        report = verify_emulated(bundle_dir, data_dir, DEFAULT_STEPS if steps is None else steps,
                                 cache_dir=sysroot_cache, progress=progress and not as_json,
                                 log=(lambda _: None) if as_json else _echo, trust=trust, digest=digest)
    else:
        from ..reference.parity import verify as run_verify
        from ..runtime.bundle import load_bundle

        bundle = load_bundle(bundle_dir, trust, digest)
        source, x, y = load_split(bundle.model, data_dir, "train")
        report = run_verify(bundle.model, bundle.target, bundle.programs, bundle.params, bundle.state, bundle.step,
                            x, y, bundle.manifest["batch"]["infer"], 100 if steps is None else steps,
                            data=source.describe(), progress=progress, log=None if as_json else _echo)
        if bundle.reduced:
            from ..compiler.quantize import check_reduced_programs

            section = bundle.manifest["reduced_precision"]
            report["reduced_precision"] = check_reduced_programs(
                bundle.model, section, bundle.path, bundle.params, data_dir, bundle.manifest["batch"]["infer"],
                section["accuracy_budget_points"], run_here=True)
            report["passed"] = report["passed"] and report["reduced_precision"]["passed"]
    report["bundle"] = str(bundle_dir)
    if report_path is not None:
        write_json(report_path, report)
    if as_json:
        click.echo(json.dumps(report))
    else:
        for line in summary_lines(report):
            click.echo(line)
        if "emulated" in report:
            e = report["emulated"]
            step_ms = f"{e['train_step_ms_median']:.1f} ms" if e["train_step_ms_median"] is not None else "n/a"
            click.echo(f"  ran on {e['device']}: train_step median {step_ms}, {e['guest_seconds']:.0f} s on the device")
            rss = e["cost"]["peak_rss_mib"]
            heap = e["cost"]["heap_in_use_mib"]
            click.echo(f"  device {cost_line({**e['cost'], 'peak_rss_mib': rss['after_inference']})} after inference, "
                       f"{rss['after_finetuning']:.0f} MiB after fine-tuning (qemu process: an upper bound); "
                       f"heap in use {heap['after_inference']} MiB after inference, {heap['after_finetuning']} MiB "
                       "after fine-tuning (a lower bound)")
            for c in e["cost"]["instructions"]:
                click.echo(f"  {c['program']:<22} {c['rows']:>4} row(s): {c['instructions_per_call'] / 1e6:9.2f} M "
                           f"aarch64 instructions per call ({c['instructions_per_row'] / 1e3:.0f} k per row)")
    if not report["passed"]:
        raise SystemExit(1)


@main.command()
@click.argument("bundle_dir", metavar="BUNDLE", type=click.Path(path_type=Path))
@click.option("--prompt", required=True, help="Text to continue; its last 10 characters (after cleaning) start the context.")
@click.option("--length", type=int, default=200, show_default=True, help="Characters to generate.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the draws (the same seed, the same text).")
@click.option("--greedy", is_flag=True, help="Always take the most probable character instead of drawing one.")
@click.option("--weights", type=click.Path(path_type=Path), default=None, help="Use a checkpoint's weights instead of the bundle's.")
@JSON
@trust_options
def generate(bundle_dir, prompt, length, seed, greedy, weights, as_json, trust, digest):
    """Next-character bundles: continue PROMPT with characters drawn from the model, with only the
    bundle's infer_softmax and the torch-free runtime (the way self-generated negatives are made)."""
    from ..runtime.bundle import load_bundle

    bundle = load_bundle(bundle_dir, trust, digest)
    if weights is not None:
        bundle = bundle.with_weights(weights)
    text = bundle.generate(prompt, length, seed, greedy)
    report(as_json, {"prompt": prompt, "text": text, "seed": seed, "greedy": greedy}, text)


@main.command()
@click.argument("bundle_dir", metavar="BUNDLE", type=click.Path(path_type=Path))
@DATA_DIR
@click.option("--epochs", type=int, required=True, help="Epochs of fine-tuning in total (with --resume: including those done).")
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help=f"Output folder for {CHECKPOINT} and {METRICS} (default: BUNDLE.finetune beside the bundle).")
@click.option("--resume", is_flag=True, help="Continue an interrupted fine-tuning run in --out.")
@click.option("--split", type=click.Choice(["train", "trainval"]), default="train", show_default=True,
              help="train: validate on the held-out part each epoch (see train --help); trainval: train on both.")
@click.option("--limit", type=int, default=None, help="Use only the first N training examples.")
@PROGRESS
@JSON
@trust_options
def finetune(bundle_dir, data_dir, epochs, out_dir, resume, split, limit, progress, as_json, trust, digest):
    """Forward-Forward training on this machine with the bundle's compiled train_step (no torch):
    starts from the bundle's weights, never writes into the bundle."""
    from ..runtime.bundle import load_bundle
    from ..runtime.finetune import refuse_inside_bundle

    bundle = load_bundle(bundle_dir, trust, digest)
    out_dir = out_dir or bundle_dir.parent / f"{bundle_dir.name}.finetune"
    refuse_inside_bundle(out_dir, bundle_dir)
    source, x, y = load_split(bundle.model, data_dir, split)
    if limit is not None:
        _check_limit(bundle.model, limit)
        x, y = x[:limit], y[:limit]
    val = load_split(bundle.model, source, "val")[1:] if split == "train" else None
    _echo(f"fine-tuning {bundle.model.name} on {bundle.target['name']} with {len(x)} examples ({source.describe()}); "
          f"writing {out_dir}")
    ckpt = bundle.finetune(x, y, epochs, out_dir, resume=resume, progress=show_progress(progress, as_json), val=val,
                           log=_echo)
    tuned = bundle.with_weights(out_dir / CHECKPOINT)
    _, x_test, y_test = load_split(bundle.model, source, "test")
    errors, lines = {}, []
    for readout in tuned.readouts:
        errors[readout] = {"test": tuned.evaluate(x_test, y_test, readout, "float32").error_percent}
        if val is not None:
            errors[readout]["val"] = tuned.evaluate(val[0], val[1], readout, "float32").error_percent
        parts = [f"{split_name} error {err:.2f}%" for split_name, err in sorted(errors[readout].items(), reverse=True)]
        lines.append(f"{bundle.model.name} after {ckpt.epoch} epoch(s) ({readout} readout): {', '.join(parts)}")
    lines.append(f"wrote {out_dir / CHECKPOINT} and {METRICS}; use it with `ffcompile run {bundle_dir} --weights "
                 f"{out_dir / CHECKPOINT}`")
    report(as_json, {"out": str(out_dir), "model": bundle.model.name, "epochs": ckpt.epoch, "step": ckpt.step,
                     "error_percent": errors}, "\n".join(lines))


@main.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["onnx"]), default="onnx", show_default=True,
              help="Output format.")
@click.option("-o", "--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The file to write (model.onnx).")
@click.option("--readout", type=click.Choice(["goodness", "softmax"]), default=None,
              help="Which inference program (default: goodness where the model has it, else softmax).")
@DTYPE
@DATA_DIR
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def export(source, fmt, out_path, readout, dtype, data_dir, as_json):
    """Write a trained run's (or a bundle's) inference program as one self-contained ONNX file:
    weights inside, any batch size, metadata that says how to feed it (opset 18). Any ONNX
    client can run it without ffcompile: see docs/export.md. int8 is calibrated on training
    rows of the model's data (--data-dir)."""
    from ..compiler.export import export_onnx, load_source
    from ..compiler.quantize import calibration_rows, quantize
    from ..contract.checkpoint import atomic_write
    from ..lowering import readouts_of

    model, params, digest = load_source(source)
    readout = readout or readouts_of(model)[0]
    proto = quantize(export_onnx(model, params, readout, digest), dtype,
                     calibration_rows(model, data_dir) if dtype == "int8" else None)
    atomic_write(out_path, lambda tmp: tmp.write_bytes(proto.SerializeToString()))
    report = {"out": str(out_path), "format": fmt, "model": model.name, "readout": readout, "dtype": dtype,
              "bytes": out_path.stat().st_size, "source_sha256": digest}
    if as_json:
        click.echo(json.dumps(report))
    else:
        _echo(f"wrote {out_path}: {model.name}, {readout} readout in {dtype}, {report['bytes']} bytes, any batch size")
