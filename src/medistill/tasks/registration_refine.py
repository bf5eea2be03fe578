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
    teacher_steps: int = Field(
        0,
        ge=0,
        description="distillation stages: the frozen teacher's field on each training pair is refined by "
        "this many steps on the stage's registration loss before the student is pulled to it (0: raw)",
    )


def refine_displacement(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    u0: torch.Tensor,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    cfg: RegRefine,
) -> torch.Tensor:
    """``u0 + up(r)`` after ``cfg.steps`` Adam steps on ``loss(warped, u)``; ``fixed``/``moving``
    ``1 1 *spatial``, ``u0`` ``1 N *spatial`` in voxels (``warped(x) = moving(x + u(x))``)."""
    if cfg.steps == 0:
        return u0
    spatial = tuple(u0.shape[2:])
    coarse = tuple(max(2, -(-s // cfg.grid)) for s in spatial)
    r = torch.zeros(u0.shape[0], u0.shape[1], *coarse, device=u0.device, dtype=torch.float32)
    r.requires_grad_(True)
    opt = torch.optim.Adam([r], lr=cfg.lr)
    u0, fixed, moving = u0.detach().float(), fixed.float(), moving.float()
    mode = "trilinear" if len(spatial) == 3 else "bilinear"

    def field() -> torch.Tensor:
        return u0 + (
            r if coarse == spatial else F.interpolate(r, size=spatial, mode=mode, align_corners=True)
        )

    with torch.enable_grad():
        for _ in range(cfg.steps):
            u = field()
            value = loss(warp(moving, u), u)
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
    with torch.no_grad():
        return field()


def stage_objective(
    task: Any, stage: str, fixed: torch.Tensor
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``loss(warped, u)``: the similarity and flow terms of ``stage`` (with their weights) for ``fixed``."""
    from types import SimpleNamespace

    from medistill.engine.trainer import Term, build_term

    spec = task.runner.stage(stage)
    terms = {
        k: Term(s.weight, build_term(s, f"stages.{stage}.losses.{k}").to(fixed.device), s)
        for k, s in spec.losses.items()
    }
    return context_objective(task, SimpleNamespace(losses=terms, stage=stage), fixed)


def context_objective(
    task: Any, ctx: Any, fixed: torch.Tensor
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``loss(warped, u)`` from a step context's loss terms, computed as the training step does (affine
    terms do not apply to a displacement)."""

    def loss(warped: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        total, _ = task.registration_loss(ctx, fixed, {"warped": warped, "flows": [u]})
        return total

    return loss
