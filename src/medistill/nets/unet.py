"""A generic 2D/3D U-Net (Ronneberger et al., MICCAI 2015; nnU-Net's plain variant, Isensee et al. 2021).

It serves several systems through its options rather than through copies:

* the 2D X-ray bone segmenter of seed D ("modified U-Net", widths 64..1024, BN + LeakyReLU(0.3),
  nearest up-sampling + 2x2 conv): ``features=(64, 128, 256, 512, 1024), norm="batch",
  act=("leakyrelu", {"negative_slope": 0.3}), upsample="nearest_conv"``. Deviation: the original's
  64->2 channel bottleneck before the 11-class classifier is replaced by a direct 1x1 head (spec D.4).
* the 2D U-Nets of seed A2.1 (teacher init 36, student init 24, IN + ELU, nearest up-sampling without
  conv, 3x3 head): ``features=tuple(init * 2**i for i in range(5)), act="elu", upsample="nearest",
  head_kernel_size=3, bias=True``.
* a plain 3D U-Net teacher or baseline for seed C.

Hook points for feature KD (names for :class:`medistill.distill.teacher.FrozenTeacher`):
``encoders.i`` is the encoder block at scale ``1/2**i`` (the last one is the bottleneck),
``decoders.s`` the decoder block at scale ``1/2**s``. :attr:`UNet.feature_names` lists the decoder
names finest first, aligned with the deep-supervision outputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.layers.factories import Conv
from torch import nn

from medistill.nets.blocks import ActSpec, DoubleConv, NormSpec, UpSample, check_divisible, max_pool
from medistill.registry import NETS


@NETS.register("unet")
class UNet(nn.Module):
    """U-Net with ``len(features)`` levels and optional deep supervision.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels ``C``.
        out_channels: logit channels (classes, or labels for a sigmoid head).
        features: width of each level, finest first; ``len(features) - 1`` poolings.
        norm: MONAI norm name or ``(name, kwargs)``; ``"instance"`` is affine, ``"none"`` disables it.
        deep_supervision: add 1x1 heads on every decoder level; ``forward(x, scales=True)`` then returns
            logits at ``[1, 1/2, 1/4, ...]`` resolution (one per decoder level).
        dropout: channel-dropout probability after every conv-norm-act.
        act: MONAI activation name or ``(name, kwargs)``.
        upsample: ``"transpose"`` (nnU-Net), ``"nearest"`` (no conv; seed A2.1) or ``"nearest_conv"``
            (seed D); see :class:`~medistill.nets.blocks.UpSample`.
        head_kernel_size: kernel of the full-resolution output conv (1, or 3 as in seed A2.1).
        bias: conv bias; ``None`` means "only where no norm follows".

    ``forward``: ``B C *S -> B out_channels *S`` logits; each ``S`` must be divisible by
    ``2 ** (len(features) - 1)``. In eval mode the output is always one tensor (clean ONNX export).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        features: Sequence[int] = (16, 32, 64, 128),
        norm: NormSpec = "instance",
        deep_supervision: bool = False,
        dropout: float = 0.0,
        *,
        act: ActSpec = "leakyrelu",
        upsample: str = "transpose",
        head_kernel_size: int = 1,
        bias: bool | None = None,
    ) -> None:
        super().__init__()
        if len(features) < 2:
            raise ValueError(f"UNet needs at least 2 levels, got features={tuple(features)}")
        feats = tuple(int(f) for f in features)
        levels = len(feats)
        self.spatial_dims = spatial_dims
        self.deep_supervision = deep_supervision
        self.divisor = 2 ** (levels - 1)
        block = {"norm": norm, "act": act, "dropout": dropout, "bias": bias}

        self.pool = max_pool(spatial_dims)
        self.encoders = nn.ModuleList(
            DoubleConv(spatial_dims, c_in, c_out, **block)
            for c_in, c_out in zip((in_channels, *feats[:-1]), feats, strict=True)
        )
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for s in range(levels - 1):  # decoder s works at scale 1/2**s, fed from level s + 1
            up_out = feats[s + 1] if upsample == "nearest" else feats[s]
            self.ups.append(UpSample(spatial_dims, feats[s + 1], up_out, upsample, norm=norm, act=act))
            self.decoders.append(DoubleConv(spatial_dims, up_out + feats[s], feats[s], **block))

        conv = Conv[Conv.CONV, spatial_dims]
        n_heads = levels - 1 if deep_supervision else 1
        self.heads = nn.ModuleList(
            conv(feats[0], out_channels, head_kernel_size, padding=head_kernel_size // 2)
            if s == 0
            else conv(feats[s], out_channels, 1)
            for s in range(n_heads)
        )
        self.feature_names: tuple[str, ...] = tuple(f"decoders.{s}" for s in range(levels - 1))

    @property
    def n_scales(self) -> int:
        """How many outputs ``forward(x, scales=True)`` returns (1 without deep supervision)."""
        return len(self.heads)

    def forward(self, x: torch.Tensor, scales: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """``x``: ``B C *S`` -> logits ``B K *S``; with ``scales=True`` the :attr:`n_scales` deep-supervision
        logits as a list, finest first (asked for explicitly, whatever the train/eval mode)."""
        check_divisible(x, self.divisor, type(self).__name__)
        skips: list[torch.Tensor] = []
        for i, enc in enumerate(self.encoders):
            x = enc(self.pool(x) if i else x)
            skips.append(x)
        x = skips.pop()
        decoded: list[torch.Tensor] = []
        for s in reversed(range(len(self.decoders))):
            x = self.decoders[s](torch.cat([skips[s], self.ups[s](x)], dim=1))
            decoded.append(x)
        decoded.reverse()  # finest first
        if scales:
            return [head(f) for head, f in zip(self.heads, decoded, strict=False)]
        return self.heads[0](decoded[0])
