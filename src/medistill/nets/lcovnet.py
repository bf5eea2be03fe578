"""LCOV-Net: a lightweight 3D segmentation net with attention-based convolutional blocks.

Zhao et al., "LCOV-Net: A Lightweight Neural Network for COVID-19 Pneumonia Lesion Segmentation from 3D
CT Images", ISBI 2021, and Zhao et al., "MSKD: Structured knowledge distillation for efficient medical
image segmentation" (LCOV-Net + CAKD/MSKD), IEEE TMI 2023; code HiLab-git/LCOVNet-and-KD (spec C.3).

Deviations from the released code (``exact=True`` and ``kernel_orientation="code"`` restore it):

* Kernel orientation: the code's (1,1,3) then (3,3,1) kernels act along W and on the D x H plane;
  the paper means a through-plane 1-D conv then an in-plane conv. We default to the paper's intent,
  "paper": ``3`` along the through-plane axis then ``3 x 3`` in-plane, with the through-plane axis an
  argument (``through_plane_axis``; ``3 x 1 x 1`` then ``1 x 3 x 3`` for axis 0 = D), since an array's
  axis order is not its anatomy; "code" gives the released ``1 x 1 x 3`` then ``3 x 3 x 1``. Both have
  the same parameter count.
* LACB-L gate: the code applies ReLU6 before the sigmoid, so the gate never drops below 0.5; we drop
  that ReLU6 (``exact=False``) so the gate can suppress.
* Dropout: channel dropout (``Dropout3d``) instead of the code's element-wise ``nn.Dropout``.
* Widths are configurable (the released class hard-codes [32, 64, 128, 256, 256] and ignores its cfg),
  and deep supervision really is switchable (the released class forces it off, breaking the KD loop).
  In training mode with deep supervision the net returns logits ``[1, 1/2, 1/4, 1/8]``; decoder
  features for MSKD/feature KD are tapped by hooks on ``decoders.s`` (see :attr:`LCOVNet.feature_names`)
  instead of being appended to the output list. Eval mode returns one tensor.

The blocks work in 2D too (``spatial_dims=2``: "paper" gives ``3 x 1`` then ``1 x 3``) at no extra code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.layers.factories import Conv, Dropout, Pool
from torch import nn

from medistill.nets.blocks import ConvNormAct, check_divisible, max_pool
from medistill.registry import NETS

ORIENTATIONS = ("paper", "code")
_LINEAR_MODE = {1: "linear", 2: "bilinear", 3: "trilinear"}


def check_axis(through_plane_axis: int, spatial_dims: int, name: str) -> int:
    """``through_plane_axis`` as a spatial axis index ``0 .. spatial_dims - 1`` of ``B C *S``, or fail."""
    if isinstance(through_plane_axis, bool) or not 0 <= int(through_plane_axis) < spatial_dims:
        raise ValueError(
            f"{name}: through_plane_axis must be a spatial axis 0..{spatial_dims - 1}, "
            f"got {through_plane_axis!r}"
        )
    return int(through_plane_axis)


def separable_kernels(
    spatial_dims: int, orientation: str, through_plane_axis: int = 0
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The (1-D, plane) kernel pair of an LACB: 3 along one axis, then 3 along all the others.

    "paper": the 1-D kernel runs along the through-plane axis (``through_plane_axis``, a spatial axis of
    ``*S``); "code": along the last axis (W), whatever ``through_plane_axis`` says (the released net).
    """
    if orientation not in ORIENTATIONS:
        raise ValueError(f"kernel_orientation {orientation!r} is not one of {ORIENTATIONS}")
    through = check_axis(through_plane_axis, spatial_dims, "LCOV-Net")
    axis = through if orientation == "paper" else spatial_dims - 1
    line = tuple(3 if a == axis else 1 for a in range(spatial_dims))
    plane = tuple(1 if a == axis else 3 for a in range(spatial_dims))
    return line, plane


class LACB(nn.Module):
    """Lightweight Attention-based Convolutional Block: ``F'' + alpha * F'`` (spec C.3.1, C.3.2).

    Both variants: ``F' = ReLU6(BN(conv_line(F)))``, ``F'' = Drop(ReLU6(BN(conv_plane(F'))))``.

    * LACB-H (``low_res=False``, every encoder/decoder level): dense plane conv; the gate
      ``alpha = sigmoid(up2(BN(conv1(avgpool_{k4,s2,p1}(F')))))`` is computed at half resolution, so
      every ``S`` must be even.
    * LACB-L (``low_res=True``, bottleneck): depthwise plane conv; ``alpha = sigmoid(Drop(BN(conv1(F'))))``
      (``exact=True``: a ReLU6 before the sigmoid, as released).

    ``B C_in *S -> B C_out *S``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        *,
        low_res: bool = False,
        dropout: float = 0.2,
        kernel_orientation: str = "paper",
        exact: bool = False,
        through_plane_axis: int = 0,
    ) -> None:
        super().__init__()
        line, plane = separable_kernels(spatial_dims, kernel_orientation, through_plane_axis)
        kw = {"norm": "batch", "act": "relu6", "bias": True}
        groups = out_channels if low_res else 1
        self.pre = ConvNormAct(spatial_dims, in_channels, out_channels, line, **kw)
        self.spatial = ConvNormAct(spatial_dims, out_channels, out_channels, plane, groups=groups, **kw)
        self.drop = _dropout(spatial_dims, dropout, exact)
        gate_act = "relu6" if exact and low_res else "none"
        conv1 = ConvNormAct(
            spatial_dims, out_channels, out_channels, 1, norm="batch", act=gate_act, bias=True
        )
        # gate logits, before the sigmoid
        self.gate = (
            nn.Sequential(conv1, _dropout(spatial_dims, dropout, exact))
            if low_res
            else nn.Sequential(
                Pool[Pool.AVG, spatial_dims](kernel_size=4, stride=2, padding=1),
                conv1,
                nn.Upsample(scale_factor=2, mode=_LINEAR_MODE[spatial_dims], align_corners=False),
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre(x)
        return self.drop(self.spatial(pre)) + torch.sigmoid(self.gate(pre)) * pre


def _dropout(spatial_dims: int, p: float, exact: bool) -> nn.Module:
    """Element-wise dropout as released (``exact``), else channel dropout; identity when ``p == 0``."""
    if p <= 0:
        return nn.Identity()
    return nn.Dropout(p) if exact else Dropout[Dropout.DROPOUT, spatial_dims](p)


class UpBlock(nn.Sequential):
    """1x1 conv -> BN -> ReLU6 -> dropout, then linear x2 up-sampling. ``B C_in *S -> B C_out 2*S``."""

    def __init__(
        self, spatial_dims: int, in_channels: int, out_channels: int, dropout: float, exact: bool
    ) -> None:
        super().__init__(
            ConvNormAct(spatial_dims, in_channels, out_channels, 1, norm="batch", act="relu6", bias=True),
            _dropout(spatial_dims, dropout, exact),
            nn.Upsample(scale_factor=2, mode=_LINEAR_MODE[spatial_dims], align_corners=False),
        )


@NETS.register("lcovnet")
class LCOVNet(nn.Module):
    """LCOV-Net (spec C.3.3): 4 LACB-H encoder levels, an LACB-L bottleneck, 4 LACB-H decoder levels.

    Args:
        spatial_dims: 3 (the paper) or 2.
        in_channels: image channels.
        out_channels: classes (17 for WORD: background + 16 organs).
        features: 5 widths ``[e1, e2, e3, e4, bottleneck]``; released [32, 64, 128, 256, 256] (2.79 M
            parameters), PyMIC default [32, 64, 128, 256, 512], released cfg [16, 32, 64, 128, 256].
        deep_supervision: 1x1 heads at scales 1, 1/2, 1/4, 1/8; ``forward(x, scales=True)`` returns all four.
        dropout: dropout probability in every block (0.2 as released).
        kernel_orientation: "paper" (through-plane 1-D conv first) or "code" (see module docstring).
        exact: reproduce the released quirks (ReLU6 before the LACB-L sigmoid, element-wise dropout).
        through_plane_axis: the spatial axis of ``*S`` (0-based) the "paper" 1-D kernel runs along: the
            coarse (largest-spacing) axis; tasks derive it from the working spacing (seg3d's RAS
            ``X Y Z`` arrays put an axial series' through-plane axis at 2). Default 0 (``D`` of ``D H W``).

    ``forward``: ``B C *S -> B K *S`` logits, ``S`` divisible by 16 and at least 32 (PyTorch's average
    pool needs 4 voxels at 1/8 resolution); list ``[1, 1/2, 1/4, 1/8]`` when
    training with deep supervision. Hook points: ``encoders.i``, ``bottleneck``, ``decoders.s`` (scale
    ``1/2**s``; :attr:`feature_names`, finest first).
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 17,
        features: Sequence[int] = (32, 64, 128, 256, 256),
        deep_supervision: bool = True,
        dropout: float = 0.2,
        kernel_orientation: str = "paper",
        exact: bool = False,
        through_plane_axis: int = 0,
    ) -> None:
        super().__init__()
        f = tuple(int(c) for c in features)
        if len(f) != 5:
            raise ValueError(f"LCOV-Net takes 5 widths (4 levels + bottleneck), got features={f}")
        self.deep_supervision = deep_supervision
        self.divisor = 16
        self.through_plane_axis = check_axis(through_plane_axis, spatial_dims, "LCOV-Net")
        blk = {
            "dropout": dropout,
            "kernel_orientation": kernel_orientation,
            "exact": exact,
            "through_plane_axis": self.through_plane_axis,
        }
        self.pool = max_pool(spatial_dims)  # the released "avg_pool" down-sampler is a max pool
        self.encoders = nn.ModuleList(
            LACB(spatial_dims, c_in, c_out, **blk)
            for c_in, c_out in zip((in_channels, *f[:3]), f[:4], strict=True)
        )
        self.bottleneck = LACB(spatial_dims, f[3], f[4], low_res=True, **blk)
        self.ups = nn.ModuleList(
            UpBlock(spatial_dims, c_in, f[s], dropout, exact)
            for s, c_in in enumerate((f[1], f[2], f[3], f[4]))
        )
        self.decoders = nn.ModuleList(LACB(spatial_dims, 2 * f[s], f[s], **blk) for s in range(4))
        conv = Conv[Conv.CONV, spatial_dims]
        self.heads = nn.ModuleList(conv(f[s], out_channels, 1) for s in range(4 if deep_supervision else 1))
        self.feature_names: tuple[str, ...] = tuple(f"decoders.{s}" for s in range(4))

    @property
    def n_scales(self) -> int:
        """How many outputs ``forward(x, scales=True)`` returns (4 with deep supervision, else 1)."""
        return len(self.heads)

    def forward(self, x: torch.Tensor, scales: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """``x``: ``B C *S`` -> logits ``B K *S``; with ``scales=True`` the :attr:`n_scales` deep-supervision
        logits as a list, finest first (asked for explicitly, whatever the train/eval mode)."""
        # 4 poolings, then the attention's 4^d average pool at 1/8 needs at least 4 voxels per axis
        check_divisible(x, self.divisor, type(self).__name__, minimum=32)
        skips: list[torch.Tensor] = []
        for i, enc in enumerate(self.encoders):
            x = enc(self.pool(x) if i else x)
            skips.append(x)
        x = self.bottleneck(self.pool(x))
        decoded: list[torch.Tensor] = []
        for s in reversed(range(4)):
            x = self.decoders[s](torch.cat([self.ups[s](x), skips[s]], dim=1))
            decoded.append(x)
        decoded.reverse()
        if scales:
            return [head(feat) for head, feat in zip(self.heads, decoded, strict=False)]
        return self.heads[0](decoded[0])
