"""Networks. Importing this package registers every net in :data:`medistill.registry.NETS`."""

from __future__ import annotations

from medistill.nets.blocks import ConvNormAct, DoubleConv, UpSample, count_parameters
from medistill.nets.gan import PatchGAN, ResnetGenerator
from medistill.nets.lcovnet import LACB, LCOVNet
from medistill.nets.registration import CascadeRegistration, FlowCritic, SpatialTransformer
from medistill.nets.teacher3d import DynUNetTeacher
from medistill.nets.unet import UNet

__all__ = [
    "CascadeRegistration",
    "FlowCritic",
    "SpatialTransformer",
    "LACB",
    "LACBH",
    "LACBL",
    "ConvNormAct",
    "DoubleConv",
    "DynUNetTeacher",
    "LCOVNet",
    "PatchGAN",
    "ResnetGenerator",
    "UNet",
    "UpSample",
    "count_parameters",
]
