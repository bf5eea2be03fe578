"""Figure of simulated metal-artifact pairs: clean | metal | artifact | LI | NMAR, in a HU window.

Why: a simulator is judged by eye first (are the streaks there, dark bands between metal objects, and do
LI/NMAR remove most of them?); the per-panel RMSE outside the metal (HU) puts a number under each image.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from medistill.io.atomic import atomic_path

PANELS = (
    ("clean_hu", "clean"),
    ("metal", "metal inserted"),
    ("artifact_hu", "artifact (FBP)"),
    ("li_hu", "LI"),
    ("nmar_hu", "NMAR"),
)


def _rmse_outside(image: np.ndarray, clean: np.ndarray, mask: np.ndarray) -> float:
    keep = ~mask
    return float(np.sqrt(np.mean((image[keep] - clean[keep]) ** 2)))


def metal_figure(
    samples: Sequence[dict[str, np.ndarray]],
    path: str | os.PathLike[str],
    window_hu: tuple[float, float] = (-400.0, 600.0),
    titles: Sequence[str] | None = None,
) -> None:
    """Write a PNG with one row per sample; each sample maps ``clean_hu``, ``artifact_hu``, ``metal_mask``
    and optionally ``li_hu``, ``nmar_hu`` to ``H W`` arrays. Missing baselines are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(key, name) for key, name in PANELS if key == "metal" or all(key in s for s in samples)]
    rows, cols = len(samples), len(panels)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 3.5 * rows), squeeze=False)
    lo, hi = window_hu
    for r, sample in enumerate(samples):
        clean, mask = sample["clean_hu"], sample["metal_mask"].astype(bool)
        for c, (key, name) in enumerate(panels):
            ax = axes[r, c]
            shown = clean if key == "metal" else sample[key]
            ax.imshow(shown, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            if key == "metal":  # the metal highlighted (yellow) over the clean slice
                ax.imshow(
                    np.ma.masked_where(~mask, mask), cmap="autumn", vmin=0, vmax=1, interpolation="nearest"
                )
                label = f"{name}\n{int(mask.sum())} px"
            else:
                label = (
                    name if key == "clean_hu" else f"{name}\nRMSE {_rmse_outside(shown, clean, mask):.0f} HU"
                )
            ax.set_title(label, fontsize=9)
            ax.axis("off")
        if titles is not None:
            axes[r, 0].text(2, 12, titles[r], color="yellow", fontsize=8)
    fig.suptitle(
        f"metal artifact simulation, window [{lo:.0f}, {hi:.0f}] HU; RMSE outside the metal vs clean"
    )
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
