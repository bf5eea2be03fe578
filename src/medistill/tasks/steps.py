"""Training steps shared by the segmentation-like tasks: supervised losses plus distillation.

A stage's ``losses`` are applied to the student's outputs and the targets, its ``distillers`` to the
student's and each frozen teacher's outputs on the same input (the teacher computed on the fly, once per
step). Deep-supervision outputs are asked for explicitly (``net(x, scales=True)``); terms that are not
multi-scale see only the finest output (:meth:`~medistill.engine.trainer.StepContext.total`).
"""

from __future__ import annotations

from typing import Any

import torch

from medistill.errors import MedistillError


def _floats(out: Any) -> Any:
    return [o.float() for o in out] if isinstance(out, list | tuple) else out.float()


def supervised_step(
    ctx: Any, x: torch.Tensor, target: torch.Tensor, student: str = "net"
) -> dict[str, float]:
    """One optimizer step of ``student`` on ``sum(losses) + sum(distillers)``; returns the logged parts."""
    if not ctx.losses and not ctx.distillers:
        raise MedistillError(f"stage {ctx.stage!r} has neither losses nor distillers: nothing to train")
    if len(ctx.optimizers) != 1:
        raise MedistillError(
            f"stage {ctx.stage!r}: a supervised step takes one optimizer, has {list(ctx.optimizers)}"
        )
    with ctx.autocast():
        out = _floats(ctx.models[student](x, scales=True))
        loss, parts = ctx.total(ctx.losses, out, target)
        teacher_out: dict[str, Any] = {}
        for key, term in ctx.distillers.items():
            name = term.spec.teacher
            if name not in teacher_out:
                teacher_out[name] = _floats(ctx.frozen[name](x))
            value, part = ctx.total({key: term}, out, teacher_out[name])
            loss, parts = loss + value, parts | part
    ctx.optimize(next(iter(ctx.optimizers)), loss)
    return {"loss": float(loss.detach())} | {f"loss_{k}": v for k, v in parts.items()}
