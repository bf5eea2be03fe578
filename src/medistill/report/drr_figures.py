"""The DRR report figure: radiographs at several poses, each beside the same image with its projected
label masks as coloured outlines, so a person can check by eye that bones are bright, lungs dark and every
mask sits on its structure (the original carpal-bone code shifted and blurred labels; see docs/drr.md)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from medistill.errors import MedistillError  # noqa: E402
from medistill.io.images import read_image  # noqa: E402
from medistill.physics.drr import display_image  # noqa: E402
from medistill.report.figures import save_figure  # noqa: E402


def drr_grid(folder: str | Path, out: str | Path, max_images: int = 8) -> Path:
    """Write a PNG grid (two panels per DRR: radiograph, radiograph + label outlines) of a DRR folder."""
    folder = Path(folder)
    geometry_path = folder / "geometry.json"
    if not geometry_path.is_file():
        raise MedistillError(
            f"{folder}: no geometry.json; is this a folder written by `medistill simulate drr`?"
        )
    geometry = json.loads(geometry_path.read_text())
    ids = sorted(geometry["images"])[: max(max_images, 1)]
    label_ids = geometry.get("label_ids", [])
    cmap = plt.get_cmap("tab20")
    cols = 2 if label_ids else 1
    fig, axes = plt.subplots(len(ids), cols, figsize=(3.6 * cols, 3.6 * len(ids)), squeeze=False)
    for row, image_id in enumerate(ids):
        files = geometry["images"][image_id]["files"]
        line = read_image(folder / files["lineint"]).array
        shown = display_image(torch.from_numpy(np.asarray(line, dtype=np.float32))).numpy()
        entry = geometry["images"][image_id]
        source = ", ".join(f"{v:.0f}" for v in entry["source_mm"])
        for col in range(cols):
            ax = axes[row, col]
            ax.imshow(shown, cmap="gray", vmin=0, vmax=1)
            ax.axis("off")
        axes[row, 0].set_title(f"{image_id} ({geometry.get('view', '')}) source [{source}] mm", fontsize=7)
        if label_ids and "labels" in files:
            masks = np.asarray(read_image(folder / files["labels"]).array)
            masks = masks[..., None] if masks.ndim == 2 else masks
            for channel in range(len(label_ids)):
                mask = masks[..., channel] > 0
                if mask.any() and not mask.all():
                    axes[row, 1].contour(
                        mask.astype(float), levels=[0.5], colors=[cmap(channel % 20)], linewidths=0.6
                    )
            axes[row, 1].set_title(f"{len(label_ids)} projected label masks (outlines)", fontsize=7)
    return save_figure(fig, out)
