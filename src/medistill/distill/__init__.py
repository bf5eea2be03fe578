"""Knowledge distillation. Importing this package registers every distiller in
:data:`medistill.registry.DISTILLERS`."""

from __future__ import annotations

from medistill.distill.aldk import ALDK
from medistill.distill.cakd import CAKD, class_affinity
from medistill.distill.kd import DistillLoss, FeatureKD, LogitKD, kd_divergence
from medistill.distill.mskd import MSKD
from medistill.distill.teacher import FeatureHooks, FrozenTeacher

__all__ = [
    "ALDK",
    "CAKD",
    "MSKD",
    "DistillLoss",
    "FeatureHooks",
    "FeatureKD",
    "FrozenTeacher",
    "LogitKD",
    "class_affinity",
    "kd_divergence",
]
