"""Instance optimisation: a few gradient steps on one pair's own loss after the network (``refine``).

Why: a network trained for minutes on a CPU undershoots large displacements (``docs/registration.md``:
the quick teacher recovers a third of a synthetic field), while the same loss optimised for one pair
reaches the classical tools' accuracy. Starting from the network's field, a correction ``r`` is optimised
by Adam on the similarity and smoothness terms of the network's own stage (their weights too), with
``u = u_net + up(r)``: ``r`` lives on a grid ``grid`` times coarser than the network grid, trilinearly
upsampled (fewer unknowns, smooth by construction, cheaper steps). This is the learned-initialisation +
instance-optimisation scheme of the Learn2Reg challenge entries; the network supplies the capture
range and most of the field in milliseconds, the optimisation the last millimetres. ``steps: 0`` (the
default) is the network alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field

from medistill.config import StrictModel
from medistill.nets.registration import warp


class RegRefine(StrictModel):
    steps: int = Field(
        0, ge=0, description="instance optimisation after the network: Adam steps on the pair's loss (0: off)"
    )
    lr: float = Field(0.5, gt=0, description="Adam step size, in voxels of the network grid")
    grid: int = Field(
        4, ge=1, description="the correction lives on a grid this many times coarser (trilinear upsampling)"
    )
    size: int | None = Field(
        None,
        ge=8,
        description="optimise on the images resampled to at most this many voxels per axis (a step costs "
        "0.014 s at 48^3 but 0.7 s at 128^3 on 2 cores); None: on the network grid",
    )
    teacher_steps: int = Field(
        0,
        ge=0,
        description="distillation stages: the frozen teacher's field on each training pair is refined by "
        "this many steps on the stage's registration loss before the student is pulled to it (0: raw)",
    )


Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def refine_displacement(
    fixed: torch.Tensor, moving: torch.Tensor, u0: torch.Tensor, loss: Loss, cfg: RegRefine
) -> torch.Tensor:
    """``u0 + up(r)`` after ``cfg.steps`` Adam steps on ``loss(fixed, warped, u)``; ``fixed``/``moving``
    ``B 1 *spatial``, ``u0`` ``B N *spatial`` in voxels (``warped(x) = moving(x + u(x))``).

    With ``cfg.size`` the images, ``u0`` and the loss live on a smaller grid whose corners are the network
    grid's (trilinear, ``align_corners``), so a displacement of ``d`` network voxels along an axis is
    ``d (n_work - 1) / (n_full - 1)`` there; only the correction is brought back."""
    if cfg.steps == 0:
        return u0
    full = tuple(u0.shape[2:])
    mode = "trilinear" if len(full) == 3 else "bilinear"
    u0, fixed, moving = u0.detach().float(), fixed.float(), moving.float()

    def resize(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
        return x if tuple(x.shape[2:]) == size else F.interpolate(x, size=size, mode=mode, align_corners=True)

    work = full if cfg.size is None else tuple(min(n, cfg.size) for n in full)
    scale = torch.tensor([(w - 1) / (n - 1) for w, n in zip(work, full, strict=True)], device=u0.device)
    scale = scale.view(1, -1, *[1] * len(full))
    f_w, m_w, u0_w = resize(fixed, work), resize(moving, work), resize(u0, work) * scale
    coarse = tuple(max(2, -(-n // cfg.grid)) for n in work)
    r = torch.zeros(u0.shape[0], u0.shape[1], *coarse, device=u0.device, dtype=torch.float32)
    r.requires_grad_(True)
    opt = torch.optim.Adam([r], lr=cfg.lr)
    with torch.enable_grad():
        for _ in range(cfg.steps):
            u = u0_w + resize(r, work)
            value = loss(f_w, warp(m_w, u), u)
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
    with torch.no_grad():
        return u0 + resize(r.detach(), full) / scale


def stage_objective(task: Any, stage: str) -> Loss:
    """``loss(fixed, warped, u)``: the similarity and flow terms of ``stage`` (with their weights)."""
    from types import SimpleNamespace

    from medistill.engine.trainer import Term, build_term

    spec = task.runner.stage(stage)
    terms = {
        k: Term(s.weight, build_term(s, f"stages.{stage}.losses.{k}"), s) for k, s in spec.losses.items()
    }
    return context_objective(task, SimpleNamespace(losses=terms, stage=stage))


def context_objective(task: Any, ctx: Any) -> Loss:
    """``loss(fixed, warped, u)`` from a step context's loss terms, computed as the training step does
    (affine terms do not apply to a displacement)."""

    def loss(fixed: torch.Tensor, warped: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        total, _ = task.registration_loss(ctx, fixed, {"warped": warped, "flows": [u]})
        return total

    return loss
