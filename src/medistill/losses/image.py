"""Pixel losses between a prediction and a target image (regression, synthesis, artifact reduction)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medistill.registry import LOSSES


@LOSSES.register("l1")
class L1(nn.Module):
    """Mean absolute difference ``mean |pred - target|`` (each term once: no double normalisation)."""

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.l1_loss(pred.float(), target.float())


@LOSSES.register("mse")
class MSE(nn.Module):
    """Mean squared difference ``mean (pred - target)^2``."""

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(pred.float(), target.float())
