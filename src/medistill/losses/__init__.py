"""Losses. Importing this package registers every loss in :data:`medistill.registry.LOSSES`."""

from __future__ import annotations

from medistill.losses.segmentation import DeepSupervisionLoss, DiceBCE, DiceCE, build_loss, downsample_target

__all__ = ["DeepSupervisionLoss", "DiceBCE", "DiceCE", "build_loss", "downsample_target"]
