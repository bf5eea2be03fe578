"""One training loop for every task.

The engine owns what every experiment needs and nothing medical: seeding, devices, DDP, the
distributed sampler, several models and optimizers per step (GANs and adversarial distillation),
AMP on CUDA, gradient clipping, LR schedules, validation every N steps with a best-by-metric
checkpoint, atomic checkpoints that resume exactly, TensorBoard + JSONL logs and a progress bar.

A task (:class:`medistill.tasks.base.Task`) supplies data, models and two functions:
``training_step(batch, ctx)``, which calls ``ctx.optimize(name, loss)`` once per optimizer in the
order it wants, and ``validate(models, loader, ctx)``, which returns metrics.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from medistill.config import dump_config
from medistill.engine.checkpoint import load_checkpoint, model_state, save_checkpoint
from medistill.engine.data import GlobalBatchSampler
from medistill.engine.distributed import (
    DistInfo,
    all_reduce_mean,
    barrier,
    cleanup,
    init_distributed,
    resolve_device,
    wrap_ddp,
)
from medistill.engine.logging import RunLogger, make_progress

if TYPE_CHECKING:
    from medistill.tasks.base import Task


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (model initialisation is then identical on every rank)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_lambda(schedule: str, total: int, warmup: int):
    """Multiplier of the base LR at a step: linear warm-up, then constant / cosine / poly(0.9)."""

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * t)) * 0.99 + 0.01
        if schedule == "poly":
            return (1 - t) ** 0.9 * 0.99 + 0.01
        return 1.0

    return f


@dataclass
class StepContext:
    """What a task's step sees: its models, the device, and how to apply a loss to an optimizer."""

    models: dict[str, torch.nn.Module]
    frozen: dict[str, torch.nn.Module]
    device: torch.device
    optimizers: dict[str, torch.optim.Optimizer] = field(default_factory=dict)
    scalers: dict[str, torch.amp.GradScaler] = field(default_factory=dict)
    grad_clip: float | None = None
    amp: bool = False
    step: int = 0
    dist: DistInfo = field(default_factory=DistInfo)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Mixed precision on CUDA when enabled; a no-op on CPU."""
        if self.amp and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def optimize(self, name: str, loss: torch.Tensor) -> None:
        """Backward ``loss`` and step optimizer ``name`` (zero-grad, AMP scaling, clipping)."""
        opt = self.optimizers[name]
        scaler = self.scalers[name]
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if self.grad_clip is not None:
            scaler.unscale_(opt)
            params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        scaler.step(opt)
        scaler.update()

    def unwrapped(self, name: str) -> torch.nn.Module:
        m = self.models[name]
        return getattr(m, "module", m)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


class Trainer:
    """Runs ``task`` for ``cfg.train.steps`` steps, writing everything under ``run_dir``."""

    def __init__(self, task: Task, run_dir: str | Path, stage: str = "") -> None:
        self.task = task
        self.cfg = task.cfg
        self.tcfg = task.cfg.train
        self.run_dir = Path(run_dir)
        self.stage = stage  # prefix for checkpoint names when one run trains several stages
        self.dist = init_distributed(resolve_device(self.tcfg.device))
        self.device = resolve_device(self.tcfg.device, self.dist)

    def ckpt_path(self, kind: str) -> Path:
        return self.run_dir / f"{self.stage + '_' if self.stage else ''}{kind}.pt"

    def fit(self, resume: bool = True, stop_at: int | None = None) -> dict[str, Any]:
        """Train; resume from ``last.pt`` if present. ``stop_at`` ends early as if killed (tests)."""
        tcfg, info, device = self.tcfg, self.dist, self.device
        seed_everything(self.cfg.seed)
        train_set, val_set = self.task.build_data()
        if hasattr(train_set, "seed"):
            train_set.seed = self.cfg.seed
        raw_models = {k: m.to(device) for k, m in self.task.build_models().items()}
        frozen = {k: m.to(device) for k, m in self.task.build_frozen().items()}
        models = {k: wrap_ddp(m, info, device) for k, m in raw_models.items()}
        optimizers = self.task.build_optimizers(raw_models)
        lam = lr_lambda(tcfg.lr_schedule, tcfg.steps, tcfg.warmup_steps)
        schedulers = {k: torch.optim.lr_scheduler.LambdaLR(o, lam) for k, o in optimizers.items()}
        use_scaler = tcfg.amp and device.type == "cuda"
        scalers = {k: torch.amp.GradScaler(device.type, enabled=use_scaler) for k in optimizers}
        ctx = StepContext(models, frozen, device, optimizers, scalers, tcfg.grad_clip, tcfg.amp, 0, info)

        logger = RunLogger(self.run_dir / (self.stage or "."), enabled=info.is_main)
        start, best = (
            0,
            {"metric": self.task.val_metric, "mode": self.task.val_mode, "value": None, "step": -1},
        )
        last = self.ckpt_path("last")
        if resume and last.exists():
            state = load_checkpoint(last)
            for k, m in raw_models.items():
                m.load_state_dict(state["models"][k])
            for group, objs in (("optimizers", optimizers), ("schedulers", schedulers), ("scalers", scalers)):
                for k, obj in objs.items():
                    obj.load_state_dict(state[group][k])
            torch.set_rng_state(state["rng"]["torch"])
            start, best = int(state["step"]), dict(state["best"])
            logger.truncate_after(start)
        if start >= tcfg.steps:
            logger.close()
            return {"step": start, "best": best}

        per_rank = tcfg.batch_size // info.world_size
        sampler = GlobalBatchSampler(
            len(train_set), tcfg.batch_size, self.cfg.seed, info.rank, info.world_size, start_step=start
        )
        loader = DataLoader(
            train_set,
            batch_sampler=sampler,
            num_workers=tcfg.num_workers,
            pin_memory=device.type == "cuda",
            persistent_workers=tcfg.num_workers > 0,
        )
        val_loader = None
        if val_set is not None:
            val_loader = DataLoader(val_set, batch_size=max(1, per_rank), shuffle=False, num_workers=0)

        batches: Iterator[Any] = iter(loader)
        title = f"train {self.stage}".strip()
        with make_progress(info.is_main and tcfg.progress) as progress:
            bar = progress.add_task(title, total=tcfg.steps, completed=start, info="")
            for step in range(start, tcfg.steps):
                if stop_at is not None and step >= stop_at:
                    break
                ctx.step = step
                for m in models.values():
                    m.train()
                logs = self.task.training_step(_to_device(next(batches), device), ctx)
                for s in schedulers.values():
                    s.step()
                done = step + 1
                if done % tcfg.log_every == 0 or done == tcfg.steps:
                    logs = all_reduce_mean(logs, info, device)
                    logs["lr"] = next(iter(optimizers.values())).param_groups[0]["lr"]
                    logger.log(done, logs, "train")
                    progress.update(bar, info=" ".join(f"{k}={v:.4g}" for k, v in logs.items() if k != "lr"))
                if val_loader is not None and (done % tcfg.val_every == 0 or done == tcfg.steps):
                    best = self._validate(raw_models, frozen, val_loader, ctx, logger, done, best)
                if done % tcfg.checkpoint_every == 0 or done == tcfg.steps:
                    self._save_last(done, raw_models, optimizers, schedulers, scalers, best)
                progress.update(bar, completed=done)
        logger.close()
        if best["step"] < 0 and info.is_main:  # no validation set: the last weights are the best
            self._save_best(raw_models, best | {"step": tcfg.steps})
        barrier(info)
        cleanup(info)
        return {"step": tcfg.steps, "best": best}

    def _validate(self, raw_models, frozen, loader, ctx, logger, step, best) -> dict[str, Any]:
        metrics: dict[str, float] = {}
        if self.dist.is_main:
            for m in raw_models.values():
                m.eval()
            vctx = StepContext(raw_models, frozen, self.device, amp=ctx.amp, step=step, dist=self.dist)
            with torch.no_grad():
                metrics = self.task.validate(vctx, loader)
            logger.log(step, metrics, "val")
            value = metrics.get(self.task.val_metric)
            if value is None:
                raise KeyError(f"validate() did not return the validation metric {self.task.val_metric!r}")
            better = best["value"] is None or (
                value > best["value"] if self.task.val_mode == "max" else value < best["value"]
            )
            if better:
                best = best | {"value": float(value), "step": step}
                self._save_best(raw_models, best)
        barrier(self.dist)
        return best

    def _base_state(self, raw_models) -> dict[str, Any]:
        return {
            "task": self.cfg.task,
            "stage": self.stage,
            "config": dump_config(self.cfg),
            "models": {k: model_state(m) for k, m in raw_models.items()},
        }

    def _save_best(self, raw_models, best) -> None:
        save_checkpoint(
            self._base_state(raw_models) | {"step": best["step"], "best": best}, self.ckpt_path("best")
        )

    def _save_last(self, step, raw_models, optimizers, schedulers, scalers, best) -> None:
        if not self.dist.is_main:
            return
        state = self._base_state(raw_models) | {
            "step": step,
            "best": best,
            "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in schedulers.items()},
            "scalers": {k: s.state_dict() for k, s in scalers.items()},
            "rng": {"torch": torch.get_rng_state()},
        }
        save_checkpoint(state, self.ckpt_path("last"))
