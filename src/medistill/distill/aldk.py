"""ALDK: adversarial learning with distilled knowledge (Tran et al., IEEE TMI 2022), made to work.

A linear WGAN-GP critic ``D`` (:class:`medistill.nets.registration.FlowCritic`, a model of the student
stage with its own optimizer) scores displacement fields: the frozen teacher's field ``phi_t`` is real,
the student's ``phi_s`` is fake, both computed on the **same augmented pair** in the same step (the
teacher on the fly, under ``no_grad``). Per step:

* critic (``n_critic`` times): ``L_D = D(phi_hat) - D(phi_t) + gp_weight * (||grad D(phi~)|| - 1)^2`` with
  ``phi_hat = beta phi_t + (1 - beta) phi_s`` (the paper's "distilled" field; ``phi_s`` detached) and
  ``phi~`` uniformly between ``phi_t`` and ``phi_hat`` (one weight per sample, gradient norm over every
  voxel and channel; ``lipschitz="rms"`` makes the critic 1-Lipschitz in the RMS displacement instead);
* student: ``gamma * L_reg + (1 - gamma) * L_adv`` with, for ``form="wgan"``, ``L_adv = -mean D(phi_hat)``
  (the WGAN generator loss) or, for ``form="paper"``, ``mean (D(phi_s) - D(phi_t))^2``.

Fixed against the released code: the adversarial term has a gradient (the original wrapped it in a
``py_func``), the critic is optimised (it was never in an optimizer's list), the penalty interpolates
fields (not logits), teacher fields come from the augmented pair (not stored un-augmented ones) and
``gamma`` is one scalar. Defaults beta 0.1, gamma 0.3, lambda 0.1 as in the original's ``train.py``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from medistill.registry import DISTILLERS


@DISTILLERS.register("aldk")
class ALDK(nn.Module):
    """The ALDK terms (no parameters: the critic is a model of the stage, passed in)."""

    def __init__(
        self,
        gamma: float = 0.3,
        beta: float = 0.1,
        gp_weight: float = 0.1,
        n_critic: int = 1,
        form: Literal["wgan", "paper"] = "wgan",
        lipschitz: Literal["l2", "rms"] = "l2",
    ) -> None:
        super().__init__()
        if not 0 <= gamma <= 1 or not 0 <= beta <= 1:
            raise ValueError(f"aldk: gamma and beta must be in [0, 1], got {gamma}, {beta}")
        if n_critic < 1:
            raise ValueError(f"aldk: n_critic must be >= 1, got {n_critic}")
        self.gamma, self.beta, self.gp_weight, self.n_critic, self.form = (
            gamma,
            beta,
            gp_weight,
            n_critic,
            form,
        )
        # "l2": 1-Lipschitz in the L2 norm over every voxel and channel (scores grow with sqrt(voxels));
        # "rms": in the RMS displacement (voxels), so score gaps stay commensurate with the registration
        # loss whatever the field size: the gradient norm is compared with 1 / sqrt(voxels * channels)
        self.lipschitz = lipschitz

    def distilled(self, teacher_flow: torch.Tensor, student_flow: torch.Tensor) -> torch.Tensor:
        """``beta phi_t + (1 - beta) phi_s``."""
        return self.beta * teacher_flow + (1 - self.beta) * student_flow

    def critic_loss(
        self, critic: nn.Module, teacher_flow: torch.Tensor, student_flow: torch.Tensor
    ) -> torch.Tensor:
        """The critic's WGAN-GP loss (the student's field is detached)."""
        real = teacher_flow.detach()
        fake = self.distilled(real, student_flow.detach())
        shape = (real.shape[0],) + (1,) * (real.ndim - 1)
        alpha = torch.rand(shape, device=real.device, dtype=real.dtype)
        mixed = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
        scores = critic(torch.cat([real, fake, mixed]))
        s_real, s_fake, s_mixed = scores.split(real.shape[0])
        (grad,) = torch.autograd.grad(s_mixed.sum(), mixed, create_graph=True)
        norm = grad.flatten(1).norm(dim=1)
        if self.lipschitz == "rms":
            norm = norm * grad[0].numel() ** 0.5
        penalty = ((norm - 1) ** 2).mean()
        return s_fake.mean() - s_real.mean() + self.gp_weight * penalty

    def adversarial(
        self, critic: nn.Module, teacher_flow: torch.Tensor, student_flow: torch.Tensor
    ) -> torch.Tensor:
        """The student's adversarial term (the critic must be frozen by the caller)."""
        if self.form == "paper":
            return ((critic(student_flow) - critic(teacher_flow.detach())) ** 2).mean()
        return -critic(self.distilled(teacher_flow.detach(), student_flow)).mean()

    def student_loss(self, registration: torch.Tensor, adversarial: torch.Tensor) -> torch.Tensor:
        """``gamma * L_reg + (1 - gamma) * L_adv``."""
        return self.gamma * registration + (1 - self.gamma) * adversarial

    def forward(self, registration: torch.Tensor, adversarial: torch.Tensor) -> torch.Tensor:
        return self.student_loss(registration, adversarial)
