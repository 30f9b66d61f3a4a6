"""Benchmark (not a test): the two lowerings of locally connected layers (footnote 8).

``masked_dense``: the weight is a dense [out, in] matrix, zero off a constant connectivity mask
(footnote 13); one big matmul per product, gradients multiplied by the mask.
``blocked``: the weight holds only each unit's receptive field [out, window]; every grid location
gathers its window with slices and runs its own small matmul.

For each of the paper's three local layers (models/mnist-local.toml) it times one layer's share of
a train step: forward, local gradient, peer normalization and the Adam update, on [positives;
negatives] rows. It also times the whole ``train_step`` of the model. Each program runs with the
torch reference backend and with onnxruntime (CPU, or CUDA where available); both forms compute the
same numbers (checked here on the layer programs before timing). Writes JSON.

    python bench/bench_local.py --out bench_local.json
    python bench/bench_local.py --device cuda --repeats 50
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ffcompile.compiler.onnx_emit import to_onnx  # noqa: E402
from ffcompile.reference.interpreter import TorchProgram  # noqa: E402
from ffcompile.lowering import build_program, init_state, local  # noqa: E402
from ffcompile.lowering.layer import forward, local_gradient, peer_normalization  # noqa: E402
from ffcompile.lowering.optimizers import apply_update  # noqa: E402
from ffcompile.core.builder import Builder  # noqa: E402
from ffcompile.runtime.ort import OrtProgram, available_providers  # noqa: E402
from ffcompile.core.spec import load_model  # noqa: E402


def layer_program(model, i: int, batch: int):
    """One local layer's part of a train step, in the current ``local.lowering_form``."""
    layer = model.layers[i]
    geo = local.geometry(model, i)
    b = Builder(f"{layer.name}_step")
    x = b.input("x", (2 * batch, geo.dense_fan_in))
    params = {f"{layer.name}.weight": b.input(f"{layer.name}.weight", local.weight_shape(model, i)),
              f"{layer.name}.bias": b.input(f"{layer.name}.bias", (layer.size,))}
    state = {f"{k}.{slot}": b.input(f"{k}.{slot}", v.shape) for k, v in params.items() for slot in ("m", "v")}
    peer_mean = b.input("peer_mean", (layer.size,))
    lr, step = b.input("lr", ()), b.input("step", ())
    z, y = forward(b, x, params, model, i)
    rule = local_gradient(b, x, z, y, model, i, batch)
    x_sum = b.reduce_sum(b.slice(x, 0, 0, batch), [0], keepdims=True)
    _, pw, pb, _ = peer_normalization(b, x_sum, b.reduce_sum(b.slice(y, 0, 0, batch), [0]), peer_mean, model, i, batch)
    grads = {f"{layer.name}.weight": b.add(rule.weight, pw), f"{layer.name}.bias": b.add(rule.bias, pb)}
    for name, param in params.items():
        new, slots = apply_update(b, model, name, param, grads[name], state, lr, step)
        b.output(f"new.{name}", new)
        for slot, value in slots.items():
            b.output(f"new.{slot}", value)
    b.output("loss", rule.loss)
    return b.build()


def layer_feeds(model, i: int, batch: int, form: str, rng) -> dict[str, np.ndarray]:
    layer = model.layers[i]
    geo = local.geometry(model, i)
    compact = local.init_weight(model, i, rng, "blocked")
    m = np.abs(rng.normal(0, 1e-3, compact.shape)).astype(np.float32)
    v = np.abs(rng.normal(0, 1e-6, compact.shape)).astype(np.float32)
    as_form = (lambda w: w) if form == "blocked" else (lambda w: local.dense_weight(model, i, w))
    name = layer.name
    return {"x": np.abs(rng.normal(0, 1, (2 * batch, geo.dense_fan_in))).astype(np.float32),
            f"{name}.weight": as_form(compact), f"{name}.bias": np.zeros(layer.size, np.float32),
            f"{name}.weight.m": as_form(m), f"{name}.weight.v": as_form(v),
            f"{name}.bias.m": np.zeros(layer.size, np.float32), f"{name}.bias.v": np.zeros(layer.size, np.float32),
            "peer_mean": np.abs(rng.normal(0, 0.1, layer.size)).astype(np.float32),
            "lr": np.float32(1e-3), "step": np.float32(3)}


def step_feeds(model, batch: int, rng) -> dict[str, np.ndarray]:
    params, state = init_state(model, seed=0)
    x = rng.random((batch, model.input.size), dtype=np.float32)
    return {**params, **state, "x": x, "x_other": x[::-1].copy(),
            "mask_bits": rng.integers(0, 2, x.shape).astype(np.float32),
            "y": rng.integers(0, 10, batch).astype(np.int64), "lr": np.float32(1e-3), "step": np.float32(1)}


def runners(program, device: str, threads: int | None):
    import torch

    torch_program = TorchProgram(program, device)
    names = {v.name for v in program.inputs}

    def run_torch(feeds):
        out = torch_program.run_numpy({k: v for k, v in feeds.items() if k in names})
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return out

    providers = ["CUDAExecutionProvider"] if device.startswith("cuda") else ["CPUExecutionProvider"]
    if not set(providers) <= set(available_providers()):
        return {"torch": run_torch}  # e.g. a CPU-only onnxruntime on a GPU machine
    ort_program = OrtProgram(to_onnx(program).SerializeToString(), providers, threads, name=program.name)
    return {"torch": run_torch, "onnxruntime": ort_program.run}


def seconds_per_run(run, feeds, repeats: int) -> dict:
    run(feeds)  # warm-up: allocations, ORT arena, cuBLAS handles
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run(feeds)
        times.append(time.perf_counter() - started)
    return {"median_ms": round(1e3 * float(np.median(times)), 3), "min_ms": round(1e3 * min(times), 3)}


def macs(model, i: int, batch: int, form: str) -> int:
    """Multiply-adds of the forward and weight-gradient products for 2 * batch rows."""
    rows, cols = local.weight_shape(model, i, form)
    return 2 * (2 * batch) * rows * cols


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / "models" / "mnist-local.toml"))
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (torch device; ORT uses its CUDA provider)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for torch and onnxruntime (on a shared machine, 1 gives steadier numbers)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--skip-train-step", action="store_true", help="time only the per-layer programs")
    ap.add_argument("--out", default="bench_local.json")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model)
    result = {"benchmark": "local-layer lowering: masked dense vs blocked", "model": model.name,
              "onnxruntime_providers": available_providers(),
              "batch": args.batch, "device": args.device, "host": platform.node(), "torch": torch.__version__,
              "torch_threads": torch.get_num_threads(), "repeats": args.repeats, "layers": {}, "train_step": {}}
    for i, layer in enumerate(model.layers):
        geo = local.geometry(model, i)
        entry = {"locations": geo.locations, "channels": geo.channels, "window": geo.window,
                 "dense_fan_in": geo.dense_fan_in}
        outputs = {}
        for form in local.FORMS:
            with local.lowering_form(form):
                program = layer_program(model, i, args.batch)
            feeds = layer_feeds(model, i, args.batch, form, np.random.default_rng(i))
            run = runners(program, args.device, args.threads)
            outputs[form] = run["onnxruntime" if "onnxruntime" in run else "torch"](feeds)
            entry[form] = {"macs": macs(model, i, args.batch, form), "ops": len(program.nodes),
                           **{backend: seconds_per_run(fn, feeds, args.repeats) for backend, fn in run.items()}}
            print(f"{layer.name} {form}: {json.dumps(entry[form])}", file=sys.stderr, flush=True)
        entry["max_abs_diff_new_weight"] = float(np.abs(
            local.dense_weight(model, i, outputs["blocked"][f"new.{layer.name}.weight"])
            - outputs["masked_dense"][f"new.{layer.name}.weight"]).max())
        result["layers"][layer.name] = entry
    if not args.skip_train_step:
        for form in local.FORMS:
            with local.lowering_form(form):
                program = build_program(model, "train_step", args.batch)
                feeds = step_feeds(model, args.batch, np.random.default_rng(0))
            run = runners(program, args.device, args.threads)
            result["train_step"][form] = {"ops": len(program.nodes),
                                          **{backend: seconds_per_run(fn, feeds, args.repeats) for backend, fn in run.items()}}
            print(f"train_step {form}: {json.dumps(result['train_step'][form])}", file=sys.stderr, flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
