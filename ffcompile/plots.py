"""Pictures that beat numbers: learning curves, and first-layer receptive fields (paper fig. 2)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def learning_curves(history: list[dict], path: Path, title: str = "") -> Path:
    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for key in sorted({k for r in history for k in r if k.startswith("loss.")}):
        axes[0].plot(epochs, [r.get(key, np.nan) for r in history], label=key[5:])
    axes[0].set(title="local losses (train)", xlabel="epoch", yscale="log")
    for key in sorted({k for r in history for k in r if k.startswith("separation.")}):
        axes[1].plot(epochs, [r.get(key, np.nan) for r in history], label=key.split(".", 1)[1])
    axes[1].set(title="goodness separation pos - neg (train)", xlabel="epoch")
    for key in sorted({k for r in history for k in r if k.startswith("val_error.")}):
        axes[2].plot(epochs, [r.get(key, np.nan) for r in history], marker="o", label=key.split(".", 1)[1])
    axes[2].set(title="validation error %", xlabel="epoch", yscale="log")
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
    label in the first pixels, the top-left row shows each unit's label preference (fig. 2)."""
    count = min(count, weight.shape[0])
    side = int(np.ceil(np.sqrt(count)))
    fig, axes = plt.subplots(side, side, figsize=(side * 0.9, side * 0.9))
    for k, ax in enumerate(np.atleast_1d(axes).ravel()):
        ax.axis("off")
        if k < count:
            w = weight[k].reshape(image_shape)
            lim = float(np.abs(w).max()) or 1.0
            ax.imshow(w, cmap="gray", vmin=-lim, vmax=lim)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(pad=0.1)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
