"""Pictures that beat numbers: learning curves, first-layer receptive fields (paper fig. 2) and
hybrid negative images (paper fig. 1)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def learning_curves(history: list[dict], path: Path, title: str = "") -> Path:
    """Local losses, goodness separation, validation error; next-character models add the
    perplexity of the next character on the training and validation strings."""
    epochs = [r["epoch"] for r in history]
    perplexities = sorted({k for r in history for k in r if k.endswith("_perplexity")})
    fig, axes = plt.subplots(1, 4 if perplexities else 3, figsize=(18 if perplexities else 14, 4))
    marker = "o" if len(epochs) == 1 else None  # a single epoch is a point, not a line
    for key in sorted({k for r in history for k in r if k.startswith("loss.")}):
        axes[0].plot(epochs, [r.get(key, np.nan) for r in history], marker=marker, label=key[5:])
    axes[0].set(title="local losses (train)", xlabel="epoch", yscale="log")
    for key in sorted({k for r in history for k in r if k.startswith("separation.")}):
        axes[1].plot(epochs, [r.get(key, np.nan) for r in history], marker=marker, label=key.split(".", 1)[1])
    axes[1].set(title="goodness separation pos - neg (train)", xlabel="epoch")
    for key in sorted({k for r in history for k in r if k.startswith("val_error.")}):
        axes[2].plot(epochs, [r.get(key, np.nan) for r in history], marker="o", label=key.split(".", 1)[1])
    axes[2].set(title="validation error %", xlabel="epoch", ylim=(0, None))
    for key in perplexities:
        axes[3].plot(epochs, [r.get(key, np.nan) for r in history], marker="o", label=key.split("_", 1)[0])
    if perplexities:
        axes[3].set(title="perplexity of the next character", xlabel="epoch", ylim=(1, None))
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def receptive_fields(weight: np.ndarray, image_shape: tuple[int, int], path: Path, count: int = 100,
                     title: str = "") -> Path:
    """The incoming weights of the first ``count`` units of the first layer as images; with the
    label in the first pixels, the top-left row shows each unit's label preference (fig. 2).
    Rows of 3 channel planes (CIFAR-10) are drawn in colour: 0 is mid-grey, each unit scaled to
    its largest weight; other channel counts as the sum over channels."""
    count = min(count, weight.shape[0])
    channels = weight.shape[1] // (image_shape[0] * image_shape[1])
    side = int(np.ceil(np.sqrt(count)))
    fig, axes = plt.subplots(side, side, figsize=(side * 0.9, side * 0.9))
    for k, ax in enumerate(np.atleast_1d(axes).ravel()):
        ax.axis("off")
        if k < count:
            w = weight[k].reshape(channels, *image_shape)
            lim = float(np.abs(w).max()) or 1.0
            if channels == 3:
                ax.imshow(w.transpose(1, 2, 0) / (2 * lim) + 0.5)
            else:
                ax.imshow(w.sum(0), cmap="gray", vmin=-lim * channels, vmax=lim * channels)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(pad=0.1)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def first_layer_images(model, weight: np.ndarray, count: int = 100) -> np.ndarray:
    """Rows of first-layer weights as whole images [units, pixels]. A locally connected first layer
    (compact weights) is drawn at full size with zeros off each unit's field, and units are taken
    from every grid location in turn so the picture covers the whole image."""
    from ..lowering import local

    if not local.is_local(model, 0):
        return weight
    geo = local.geometry(model, 0)
    per_location = max(1, min(geo.channels, -(-count // geo.locations)))
    rows = (np.arange(geo.locations)[:, None] * geo.channels + np.arange(per_location)).ravel()
    if len(rows) > count:  # fewer units than locations: spread them over the whole grid
        rows = rows[np.linspace(0, len(rows) - 1, count).round().astype(int)]
    dense = weight if local.form(geo) == "masked_dense" else local.dense_weight(model, 0, weight)
    return dense[rows]


def hybrid_examples(model, x: np.ndarray, y: np.ndarray, path: Path, count: int = 8, seed: int = 0,
                    title: str = "") -> Path:
    """Figure 1: negatives made by the model's own ``hybrid_negatives`` program from the training
    loop's first batch (its partners and mask bits). Columns: digit, other digit, mask, hybrid."""
    from .interpreter import TorchProgram
    from ..lowering import build_program
    from ..loop.epochs import epoch_plan

    plan = epoch_plan(model, len(x), 0, seed, y)
    rows, partners = plan.order[0][:count], plan.partners[0][:count]
    count = len(rows)
    program = TorchProgram(build_program(model, "hybrid_negatives", count))
    out = program.run_numpy({"x": x[rows], "x_other": x[partners],
                             "mask_bits": plan.mask_bits(0, x.shape[1])[:count]})
    columns = [(x[rows], "digit (mask 1)", y[rows]), (x[partners], "other digit (mask 0)", y[partners]),
               (out["mask"], "mask", None), (out["negatives"], "hybrid negative", None)]
    fig, axes = plt.subplots(count, 4, figsize=(4 * 1.3, count * 1.3), squeeze=False)
    for r in range(count):
        for c, (images, heading, labels) in enumerate(columns):
            ax = axes[r, c]
            ax.imshow(images[r].reshape(model.input.image_shape), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(heading, fontsize=7)
            if labels is not None:
                ax.set_ylabel(f"label {labels[r]}", fontsize=6) if c == 0 else ax.set_xlabel(f"label {labels[r]}", fontsize=6)
    fig.suptitle(title or f"hybrid negatives ({model.negatives.blur_passes} blur passes)", fontsize=8)
    fig.tight_layout(pad=0.2, rect=(0, 0, 1, 1 - 0.25 / count))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
