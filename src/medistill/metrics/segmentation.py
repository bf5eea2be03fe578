"""Segmentation metrics on binary masks (never on colour-coded or soft images)."""

from __future__ import annotations

import numpy as np
import torch


def dice(pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor) -> float:
    """Dice of two binary masks of the same shape; 1.0 when both are empty."""
    p = np.asarray(pred.detach().cpu() if isinstance(pred, torch.Tensor) else pred).astype(bool)
    t = np.asarray(target.detach().cpu() if isinstance(target, torch.Tensor) else target).astype(bool)
    if p.shape != t.shape:
        raise ValueError(f"dice: prediction shape {p.shape} differs from target shape {t.shape}")
    denom = p.sum() + t.sum()
    if denom == 0:
        return 1.0
    return float(2.0 * np.logical_and(p, t).sum() / denom)


def dice_per_label(pred: np.ndarray, target: np.ndarray, labels: dict[str, int]) -> dict[str, float]:
    """Dice for each named label value of two integer label maps."""
    return {name: dice(pred == value, target == value) for name, value in labels.items()}
