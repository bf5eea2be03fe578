"""Losses. Importing this package registers every loss in :data:`medistill.registry.LOSSES`."""

from __future__ import annotations

from medistill.losses.adversarial import GANLoss, gradient_penalty
from medistill.losses.image import L1, MSE
from medistill.losses.regularization import AffineRegulariser, BendingEnergy, GradientSmoothness
from medistill.losses.segmentation import DeepSupervisionLoss, DiceBCE, DiceCE, build_loss, downsample_target
from medistill.losses.similarity import LocalNCCLoss, PearsonLoss
from medistill.losses.synthesis import CorrelationLoss, MaskConsistency

__all__ = [
    "AffineRegulariser",
    "BendingEnergy",
    "GradientSmoothness",
    "LocalNCCLoss",
    "PearsonLoss",
    "L1",
    "MSE",
    "DeepSupervisionLoss",
    "DiceBCE",
    "DiceCE",
    "CorrelationLoss",
    "GANLoss",
    "MaskConsistency",
    "build_loss",
    "downsample_target",
    "gradient_penalty",
]
