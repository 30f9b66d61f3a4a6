"""Benchmark (not a test): which hidden layers should feed a trained run's linear softmax readout?

The paper trains its linear classifier on "the normalised activity vectors" of chosen layers
(sec. 3.2) and says which layers only for the fully connected net. This tool takes a trained run,
computes every hidden layer's normalized activities once with the reference backend, fits a fresh
linear softmax (Adam, linear cool-down over the second half, no backprop into the hidden layers)
for each candidate set of layers, and chooses by **validation** error. Test error is reported
beside it and never used for the choice. Writes JSON.

    python bench/readout_layers.py RUN_DIR --data-dir DIR --out readout_layers.json
    python bench/readout_layers.py RUN_DIR --data-dir DIR --layers h2,h3 --layers h1,h2,h3 --lr 1e-3

Default candidates: every run of consecutive hidden layers. Feed-forward MNIST models only
(dense or locally connected, supervised or not); recurrent nets read out by goodness.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ffcompile.reference.interpreter import TorchProgram  # noqa: E402
from ffcompile.contract.checkpoint import CHECKPOINT, load_checkpoint, write_json  # noqa: E402
from ffcompile.data.datasets import load_split  # noqa: E402
from ffcompile.loop.evaluate import run_in_batches  # noqa: E402
from ffcompile.lowering.feedforward import readout_rows  # noqa: E402
from ffcompile.lowering.readouts import readout_features  # noqa: E402
from ffcompile.lowering.state import param_inputs  # noqa: E402
from ffcompile.core.builder import Builder  # noqa: E402
from ffcompile.core.spec import Model  # noqa: E402

BATCH = 1000


def layer_features(model: Model, params: dict[str, np.ndarray], x: np.ndarray) -> dict[str, torch.Tensor]:
    """Every hidden layer's normalized activities for the rows of ``x`` (neutral label for
    supervised models, as the softmax readout sees them), by layer name."""
    names = tuple(layer.name for layer in model.layers)
    every = dataclasses.replace(model, readout=dataclasses.replace(model.readout, softmax_layers=names))
    b = Builder("features")
    inputs = param_inputs(b, every)
    rows = readout_rows(b, b.input("x", (BATCH, x.shape[1])), every)
    b.output("features", readout_features(b, rows, inputs, every, "neutral"))
    program = TorchProgram(b.build())
    needed = {v.name for v in program.program.inputs}
    feeds = {k: v for k, v in params.items() if k in needed}
    joined = torch.from_numpy(run_in_batches(program.run_numpy, feeds, x, BATCH, "features"))
    widths = [layer.size for layer in model.layers]
    return dict(zip(names, torch.split(joined, widths, dim=1)))


def fit_softmax(x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, l2: float, seed: int, batch: int = 100):
    """A linear softmax fitted by minibatch Adam, full learning rate for the first half of the
    steps and a linear cool-down to 0 over the second (the models' schedule)."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.zeros(int(y.max()) + 1, x.shape[1], requires_grad=True)
    bias = torch.zeros(weight.shape[0], requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=lr)
    steps, step = epochs * (len(x) // batch), 0
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x) - batch + 1, batch):
            for group in optimizer.param_groups:
                group["lr"] = lr * min(1.0, 2.0 * (1.0 - step / steps))
            rows = order[start:start + batch]
            loss = torch.nn.functional.cross_entropy(x[rows] @ weight.T + bias, y[rows]) + l2 * (weight * weight).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
    return weight.detach(), bias.detach()


def error_percent(weight, bias, x, y) -> float:
    return round(100.0 * ((x @ weight.T + bias).argmax(1) != y).float().mean().item(), 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="run directory (or checkpoint file) of a trained MNIST model")
    ap.add_argument("--data-dir", default=None, help="full MNIST (default: $FFCOMPILE_DATA_DIR)")
    ap.add_argument("--layers", action="append", default=[], help="a candidate, comma-separated (repeatable)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, action="append", default=[])
    ap.add_argument("--l2", type=float, action="append", default=[], help="L2 penalty on the softmax weights")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="readout_layers.json")
    args = ap.parse_args()

    path = Path(args.run)
    ckpt = load_checkpoint(path / CHECKPOINT if path.is_dir() else path)
    model = ckpt.model
    if model.recurrent is not None or model.input.dataset != "mnist":
        sys.exit(f"{model.name}: only feed-forward image models have a one-pass softmax readout to choose layers for")
    names = [layer.name for layer in model.layers]
    candidates = [tuple(c.split(",")) for c in args.layers] or [
        tuple(names[i:j]) for i, j in itertools.combinations(range(len(names) + 1), 2)]
    for candidate in candidates:
        if unknown := [n for n in candidate if n not in names]:
            sys.exit(f"--layers: {', '.join(unknown)} not among {model.name}'s hidden layers ({', '.join(names)})")

    features, labels = {}, {}
    for split in ("train", "val", "test"):
        _source, x, y = load_split("mnist", args.data_dir, split)
        started = time.perf_counter()
        features[split], labels[split] = layer_features(model, ckpt.params, x), torch.as_tensor(y)
        print(f"features of {len(x)} {split} images in {time.perf_counter() - started:.1f} s", flush=True)

    results = []
    for candidate, lr, l2 in itertools.product(candidates, args.lr or [1e-3], args.l2 or [0.0, 1e-4]):
        def joined(split):
            return torch.cat([features[split][n] for n in candidate], dim=1)
        started = time.perf_counter()
        weight, bias = fit_softmax(joined("train"), labels["train"], args.epochs, lr, l2, args.seed)
        row = {"layers": list(candidate), "lr": lr, "l2": l2,
               "val_error_percent": error_percent(weight, bias, joined("val"), labels["val"]),
               "test_error_percent": error_percent(weight, bias, joined("test"), labels["test"]),
               "seconds": round(time.perf_counter() - started, 1)}
        results.append(row)
        print(f"{','.join(candidate):>16}  lr {lr:g}  l2 {l2:g}  val {row['val_error_percent']:.2f} %  "
              f"test {row['test_error_percent']:.2f} %", flush=True)
    best = min(results, key=lambda r: r["val_error_percent"])
    print(f"chosen by validation: {','.join(best['layers'])} (lr {best['lr']:g}, l2 {best['l2']:g}): "
          f"val {best['val_error_percent']:.2f} %, test {best['test_error_percent']:.2f} %")
    write_json(Path(args.out), {
        "benchmark": "linear softmax readout refitted on a trained run's frozen layers",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "model": model.name, "epochs_trained": ckpt.epoch, "readout_epochs": args.epochs,
        "trained_readout_layers": list(model.readout.softmax_layers),
        "results": results, "chosen_by_validation": best})


if __name__ == "__main__":
    main()
