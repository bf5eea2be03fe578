"""A heavy nnU-Net-like 3D teacher (Isensee et al., "nnU-Net", Nature Methods 2021) for seed C's KD.

The paper's teacher is a 5-level 3D nnU-Net whose deep-supervision outputs at scales 1, 1/2, 1/4, 1/8 feed
MSKD (spec C.4). We wrap MONAI's :class:`~monai.networks.nets.DynUNet` (nnU-Net's architecture) rather
than re-writing it. Deviation from DynUNet: in training with deep supervision, DynUNet stacks the
coarse outputs *interpolated* to full size; we return them at their own resolution, finest first, the
same contract as :class:`~medistill.nets.unet.UNet` and :class:`~medistill.nets.lcovnet.LCOVNet`, so
deep-supervision losses down-sample labels instead of smoothing logits. Eval mode returns one tensor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.networks.nets import DynUNet
from torch import nn

from medistill.nets.blocks import ActSpec, NormSpec, check_divisible
from medistill.nets.lcovnet import check_axis
from medistill.registry import NETS

Stride = int | Sequence[int]


def place_through_plane(stride: Stride, spatial_dims: int, axis: int) -> Stride:
    """A per-axis stride written through-plane first, in array axis order (its first entry moved to
    ``axis``, the in-plane entries kept in order); an int stride is the same on every axis."""
    if isinstance(stride, int):
        return stride
    s = [int(v) for v in stride]
    if len(s) != spatial_dims:
        raise ValueError(f"dynunet_teacher: stride {tuple(s)} needs one entry per axis ({spatial_dims})")
    rest = s[1:]
    rest.insert(axis, s[0])
    return tuple(rest)


@NETS.register("dynunet_teacher")
class DynUNetTeacher(nn.Module):
    """nnU-Net-style 3D (or 2D) U-Net teacher; 31 M parameters with the defaults (1 -> 17 classes).

    Args:
        spatial_dims: 3 or 2.
        in_channels: image channels.
        out_channels: classes.
        features: width per level (nnU-Net 3D full-res: 32, 64, 128, 256, 320, 320).
        strides: down-sampling stride per level (the first is 1); an int or, for anisotropic data, one
            per axis written **through-plane axis first**, e.g. ``(1, (1, 2, 2), 2, 2, 2, 2)`` keeps the
            coarse axis at full resolution one level longer (nnU-Net's plans, which put that axis first).
        through_plane_axis: the spatial axis of ``*S`` (0-based) the first entry of a per-axis stride
            acts on (the others keep their order); tasks derive it from the working spacing. Default 0.
        deep_supervision: ``forward(x, scales=True)`` returns logits at the ``1 + deep_supr_num`` finest
            scales.
        deep_supr_num: coarse deep-supervision outputs (3 gives scales 1, 1/2, 1/4, 1/8 as in LCOV-Net).
        norm, act: as DynUNet (affine instance norm, LeakyReLU 0.01: nnU-Net's choices).
        dropout: dropout probability in the conv blocks.
        res_block: residual conv blocks instead of plain ones.

    ``forward``: ``B C *S -> B K *S``; each axis divisible by the product of its strides.
    Hook points: :attr:`feature_names` (decoder outputs at each deep-supervision scale, finest first).
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 17,
        features: Sequence[int] = (32, 64, 128, 256, 320, 320),
        strides: Sequence[Stride] = (1, 2, 2, 2, 2, 2),
        deep_supervision: bool = True,
        deep_supr_num: int = 3,
        norm: NormSpec = ("instance", {"affine": True}),
        act: ActSpec = ("leakyrelu", {"negative_slope": 0.01}),
        dropout: float = 0.0,
        res_block: bool = False,
        through_plane_axis: int = 0,
    ) -> None:
        super().__init__()
        if len(features) != len(strides):
            raise ValueError(
                f"features {tuple(features)} and strides {tuple(strides)} need one entry per level"
            )
        self.through_plane_axis = check_axis(through_plane_axis, spatial_dims, "dynunet_teacher")
        strides = [place_through_plane(s, spatial_dims, self.through_plane_axis) for s in strides]
        self.deep_supervision = deep_supervision
        self.net = DynUNet(
            spatial_dims,
            in_channels,
            out_channels,
            kernel_size=[3] * len(strides),
            strides=list(strides),
            upsample_kernel_size=list(strides[1:]),
            filters=list(features),
            dropout=dropout or None,
            norm_name=norm,
            act_name=act,
            deep_supervision=deep_supervision,
            deep_supr_num=deep_supr_num,
            res_block=res_block,
        )
        per_axis = [[s] * spatial_dims if isinstance(s, int) else list(s) for s in strides]
        self.divisor = tuple(math.prod(axis) for axis in zip(*per_axis, strict=True))
        n_up = len(strides) - 1
        n_scales = 1 + (deep_supr_num if deep_supervision else 0)
        # DynUNet's upsamples run coarse -> fine; the last one is the full-resolution decoder output
        self.feature_names: tuple[str, ...] = tuple(f"net.upsamples.{n_up - 1 - s}" for s in range(n_scales))

    @property
    def n_scales(self) -> int:
        """How many outputs ``forward(x, scales=True)`` returns (``1 + deep_supr_num``, or 1)."""
        return len(self.feature_names)

    def forward(self, x: torch.Tensor, scales: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """``x``: ``B C *S`` -> logits ``B K *S``; with ``scales=True`` the :attr:`n_scales` deep-supervision
        logits as a list, finest first (asked for explicitly, whatever the train/eval mode)."""
        check_divisible(x, self.divisor, type(self).__name__)
        out = self.net.output_block(self.net.skip_layers(x))
        if scales:
            # DynUNet's skip layers leave the raw coarse head outputs in ``net.heads`` (finest first)
            return [out, *self.net.heads] if self.deep_supervision else [out]
        return out
