"""CycleGAN's networks: the ResNet generator and the PatchGAN discriminator (Zhu et al., ICCV 2017;
Johnson et al., ECCV 2016; Isola et al., CVPR 2017), for 2D images.

As in the original code (spec E.3) but configurable, so one class serves the teacher (``ngf=64``,
9 blocks: 11.4 M parameters) and a CPU student (``ngf=8..16``, fewer blocks). Deviations: InstanceNorm
keeps no running statistics (``track_running_stats=True`` in the original is a legacy setting that makes
eval differ from train); the output head is ``tanh`` as in the original, so images live in [-1, 1].

``ResnetGenerator.forward``: ``B C H W -> B out H W`` with ``H, W`` divisible by ``2 ** n_down``.
``PatchGAN.forward``: ``B C H W -> B 1 h w`` raw scores (no sigmoid: LSGAN / hinge / BCE-with-logits
are applied by :class:`medistill.losses.adversarial.GANLoss`); with ``n_layers=3`` each score sees a
70x70 patch. Weights start from N(0, 0.02), biases 0 (the original's ``init_type="normal"``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from medistill.registry import NETS


def gan_init(module: nn.Module, std: float = 0.02) -> None:
    """N(0, std) for conv weights, 0 for biases (CycleGAN's ``init_weights(..., "normal")``)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _norm(channels: int) -> nn.Module:
    return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)


class ResnetBlock(nn.Module):
    """``x + [pad, conv3, IN, ReLU, pad, conv3, IN](x)`` with reflection padding."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3, bias=True),
            _norm(channels),
            nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3, bias=True),
            _norm(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


@NETS.register("resnet_generator")
class ResnetGenerator(nn.Module):
    """Encoder (7x7 conv, ``n_down`` stride-2 convs) -> ``n_blocks`` residual blocks -> decoder.

    Args:
        in_channels, out_channels: image channels (1 for MR and CT slices).
        ngf: width of the first layer; doubled at each down-sampling.
        n_blocks: residual blocks at the lowest resolution (9 in CycleGAN for 256^2).
        n_down: stride-2 down-samplings (2 in CycleGAN).
        upsample: ``"transpose"`` (CycleGAN's stride-2 transposed 3x3 convs) or ``"resize"`` (nearest x2
            then a 3x3 conv): a transposed conv whose kernel does not divide by its stride paints a
            checkerboard, which a small generator trained briefly on few slices turns into a pixel-level
            pattern that hides the input from the cycle loss instead of synthesising anatomy.

    Hook points for feature KD: ``blocks`` (the residual trunk's output, ``B ngf*2**n_down H/4 W/4``).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        ngf: int = 64,
        n_blocks: int = 9,
        n_down: int = 2,
        upsample: Literal["transpose", "resize"] = "transpose",
    ) -> None:
        super().__init__()
        if ngf < 1 or n_blocks < 0 or n_down < 0:
            raise ValueError(f"resnet_generator: ngf={ngf}, n_blocks={n_blocks}, n_down={n_down} invalid")
        if upsample not in ("transpose", "resize"):
            raise ValueError(f"resnet_generator: upsample={upsample!r} is not 'transpose' or 'resize'")
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(in_channels, ngf, 7, bias=True),
            _norm(ngf),
            nn.ReLU(inplace=True),
        ]
        ch = ngf
        for _ in range(n_down):
            layers += [nn.Conv2d(ch, ch * 2, 3, stride=2, padding=1, bias=True), _norm(ch * 2), nn.ReLU(True)]
            ch *= 2
        self.encoder = nn.Sequential(*layers)
        self.blocks = nn.Sequential(*[ResnetBlock(ch) for _ in range(n_blocks)])
        up: list[nn.Module] = []
        for _ in range(n_down):
            if upsample == "transpose":
                up.append(
                    nn.ConvTranspose2d(ch, ch // 2, 3, stride=2, padding=1, output_padding=1, bias=True)
                )
            else:
                up += [
                    nn.Upsample(scale_factor=2, mode="nearest"),
                    nn.ReflectionPad2d(1),
                    nn.Conv2d(ch, ch // 2, 3),
                ]
            up += [_norm(ch // 2), nn.ReLU(True)]
            ch //= 2
        up += [nn.ReflectionPad2d(3), nn.Conv2d(ch, out_channels, 7), nn.Tanh()]
        self.decoder = nn.Sequential(*up)
        self.divisor = 2**n_down
        gan_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.blocks(self.encoder(x)))


AUGMENTS = ("translation", "cutout")


def diff_augment(
    x: torch.Tensor, policy: tuple[str, ...], generator: torch.Generator | None = None
) -> torch.Tensor:
    """Differentiable augmentation of what a discriminator sees (Zhao et al., NeurIPS 2020), per sample.

    ``translation``: a shift by up to 1/8 of each side, the border replicated (the background of a slice,
    so nothing new is painted); ``cutout``: a square of half the side set to the image's minimum. Applied
    to real and synthetic images alike, in the critic's and in the generator's step, so it does not
    change what the generator is pushed towards; it keeps a critic that sees a few dozen real slices
    from memorising them, which with ~50 CT slices otherwise happens within a few hundred steps and
    leaves the generator chasing pixel noise. Intensities are never changed: HU carry meaning.
    """
    b, _, h, w = x.shape
    out = x
    if "translation" in policy:
        ph, pw = max(1, h // 8), max(1, w // 8)
        padded = F.pad(out, (pw, pw, ph, ph), mode="replicate")
        dy = torch.randint(0, 2 * ph + 1, (b,), generator=generator).tolist()
        dx = torch.randint(0, 2 * pw + 1, (b,), generator=generator).tolist()
        out = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])
    if "cutout" in policy:
        ch, cw = h // 2, w // 2
        cy = torch.randint(0, h - ch + 1, (b,), generator=generator).tolist()
        cx = torch.randint(0, w - cw + 1, (b,), generator=generator).tolist()
        keep = torch.ones(b, 1, h, w, dtype=out.dtype, device=out.device)
        for i in range(b):
            keep[i, :, cy[i] : cy[i] + ch, cx[i] : cx[i] + cw] = 0
        low = out.amin(dim=(1, 2, 3), keepdim=True).detach()
        out = out * keep + low * (1 - keep)
    return out


@NETS.register("patchgan")
class PatchGAN(nn.Module):
    """The "basic" PatchGAN discriminator: C(ndf) without norm, then ``n_layers - 1`` stride-2 and one
    stride-1 conv-IN-LeakyReLU(0.2) with doubling widths (capped at ``8 ndf``), then a 1-channel 4x4 conv.

    Args:
        in_channels: channels of what it judges (1 for an image, 2 for an image + condition, masks).
        ndf: width of the first layer.
        n_layers: 3 gives the 70x70 receptive field of CycleGAN/pix2pix.
        augment: differentiable augmentations applied to the input in training mode (see
            :func:`diff_augment`; none by default, as in CycleGAN); eval mode and ONNX see the plain input.
    """

    def __init__(
        self,
        in_channels: int = 1,
        ndf: int = 64,
        n_layers: int = 3,
        augment: tuple[Literal["translation", "cutout"], ...] = (),
    ) -> None:
        super().__init__()
        if ndf < 1 or n_layers < 1:
            raise ValueError(f"patchgan: ndf={ndf}, n_layers={n_layers} invalid")
        unknown = sorted(set(augment) - set(AUGMENTS))
        if unknown:
            raise ValueError(f"patchgan: augment {unknown} unknown (choose from {', '.join(AUGMENTS)})")
        self.augment = tuple(augment)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        ch = ndf
        for n in range(1, n_layers + 1):
            out = ndf * min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ch, out, 4, stride, 1), _norm(out), nn.LeakyReLU(0.2, True)]
            ch = out
        layers.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        gan_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.augment and self.training:
            x = diff_augment(x, self.augment)
        return self.net(x)
