"""Generic figures: training curves and mask overlays (matplotlib, Agg backend, written atomically)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from medistill.engine.logging import read_metrics  # noqa: E402
from medistill.io.atomic import atomic_path  # noqa: E402


def save_figure(fig: plt.Figure, path: str | Path, dpi: int = 110) -> Path:
    """Write ``fig`` as PNG atomically and close it."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def plot_training_curves(run_dirs: dict[str, Path], out: str | Path, val_metric: str | None = None) -> Path:
    """Training loss (and a validation metric) against step for one or several runs/stages."""
    ncols = 2 if val_metric else 1
    fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 3.6), squeeze=False)
    for label, run in run_dirs.items():
        train = read_metrics(Path(run) / "metrics.jsonl", "train")
        keys = [k for k in ("loss", "loss_total") if train and k in train[0]]
        if keys:
            axes[0, 0].plot([r["step"] for r in train], [r[keys[0]] for r in train], label=label)
        if val_metric:
            val = [r for r in read_metrics(Path(run) / "metrics.jsonl", "val") if val_metric in r]
            axes[0, 1].plot([r["step"] for r in val], [r[val_metric] for r in val], "o-", label=label)
    axes[0, 0].set(xlabel="step", ylabel="training loss", yscale="log", title="training loss")
    if val_metric:
        axes[0, 1].set(xlabel="step", ylabel=val_metric, title=f"validation {val_metric}")
    for ax in axes.ravel():
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return save_figure(fig, out)


def overlay_grid(
    images: Sequence[np.ndarray],
    truths: Sequence[np.ndarray],
    preds: Sequence[np.ndarray],
    out: str | Path,
    titles: Sequence[str] | None = None,
    window: tuple[float, float] = (-1000.0, 400.0),
) -> Path:
    """Rows of image | ground truth (green) | prediction (red) with contours of both on the image."""
    n = len(images)
    fig, axes = plt.subplots(n, 3, figsize=(9, 3.1 * n), squeeze=False)
    for r in range(n):
        img = np.clip((images[r] - window[0]) / (window[1] - window[0]), 0, 1)
        for c, (mask, color, name) in enumerate(
            (
                (None, None, "image"),
                (truths[r], (0, 1, 0), "ground truth"),
                (preds[r], (1, 0, 0), "prediction"),
            )
        ):
            ax = axes[r, c]
            ax.imshow(img, cmap="gray", vmin=0, vmax=1)
            if mask is not None:
                rgba = np.zeros((*mask.shape, 4))
                rgba[mask.astype(bool)] = (*color, 0.35)
                ax.imshow(rgba)
            else:
                for m, col in ((truths[r], "lime"), (preds[r], "red")):
                    if m.any():
                        ax.contour(m.astype(float), levels=[0.5], colors=col, linewidths=0.8)
            ax.set_title(f"{titles[r]} - {name}" if titles else name, fontsize=8)
            ax.axis("off")
    return save_figure(fig, out)
