"""Adversarial losses for GANs, critics and adversarial distillation (LSGAN, BCE, hinge, WGAN + GP).

One registered module, ``gan``, with a ``mode``; the two players' losses are its methods, so a task
names the loss once and uses it on both sides::

    d_loss = adv.critic(critic(real), critic(fake.detach()))
    g_loss = adv.generator(critic(fake))

Logits may be any shape (PatchGAN maps, a scalar per sample); losses average over every element.
References: LSGAN (Mao et al., ICCV 2017), non-saturating BCE (Goodfellow et al., 2014), hinge (Lim &
Ye, 2017), WGAN-GP (Gulrajani et al., NeurIPS 2017).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medistill.registry import LOSSES

GAN_MODES = ("lsgan", "bce", "hinge", "wgan")


@LOSSES.register("gan")
class GANLoss(nn.Module):
    """The generator's and the critic's loss for ``mode`` in ``lsgan | bce | hinge | wgan``.

    ``forward(fake_logits)`` is the generator loss (so the module is a plain loss term too).
    """

    def __init__(self, mode: str = "lsgan") -> None:
        super().__init__()
        if mode not in GAN_MODES:
            raise ValueError(f"GAN mode {mode!r} is not one of {GAN_MODES}")
        self.mode = mode

    def generator(self, fake_logits: torch.Tensor) -> torch.Tensor:
        """Loss of the generator (student) whose outputs the critic scored ``fake_logits``."""
        z = fake_logits.float()
        if self.mode == "lsgan":
            return ((z - 1) ** 2).mean()
        if self.mode == "bce":
            return F.binary_cross_entropy_with_logits(z, torch.ones_like(z))
        return -z.mean()  # hinge and wgan: raise the critic's score of the fakes

    def critic(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        """Loss of the critic (discriminator) given its scores of real and of (detached) fake samples."""
        r, f = real_logits.float(), fake_logits.float()
        if self.mode == "lsgan":
            return 0.5 * (((r - 1) ** 2).mean() + (f**2).mean())
        if self.mode == "bce":
            ones, zeros = torch.ones_like(r), torch.zeros_like(f)
            return 0.5 * (
                F.binary_cross_entropy_with_logits(r, ones) + F.binary_cross_entropy_with_logits(f, zeros)
            )
        if self.mode == "hinge":
            return F.relu(1 - r).mean() + F.relu(1 + f).mean()
        return f.mean() - r.mean()  # wgan: the critic estimates the Wasserstein-1 distance

    def forward(self, fake_logits: torch.Tensor) -> torch.Tensor:
        return self.generator(fake_logits)


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """WGAN-GP: ``E[(||grad_x critic(x_hat)||_2 - 1)^2]`` at random points ``x_hat`` between real and fake
    samples (``B *``), one interpolation weight per sample (Gulrajani et al., 2017)."""
    shape = (real.shape[0],) + (1,) * (real.dim() - 1)
    eps = torch.rand(shape, device=real.device, dtype=real.dtype)
    x_hat = (eps * real.detach() + (1 - eps) * fake.detach()).requires_grad_(True)
    score = critic(x_hat)
    (grad,) = torch.autograd.grad(score.sum(), x_hat, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()
