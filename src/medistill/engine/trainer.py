"""One training loop for every stage of every task.

The engine owns what every experiment needs and nothing medical: seeding, devices, DDP, the
distributed sampler, several models and optimizers per step (GANs, critics, adversarial distillation),
one LR schedule and gradient clip per optimizer, AMP on CUDA, validation every N steps with a
best-by-metric checkpoint, atomic checkpoints that resume exactly (every optimizer and schedule, the
CPU, CUDA, numpy and Python RNGs, and registered state such as image pools), TensorBoard + JSONL logs
and a progress bar.

A :class:`Trainer` runs one stage (:class:`~medistill.config.StageSpec`) of a task
(:class:`~medistill.engine.protocol.StageTask`): it builds the stage's trainable models through the
task, its losses and distillers from the registries, and its optimizers, then calls
``task.training_step(batch, ctx)``, which calls ``ctx.optimize(name, loss)`` once per optimizer in the
order it wants. Frozen models (teachers) come ready from :mod:`medistill.engine.stages`.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from medistill.config import DistillerSpec, ExperimentConfig, LossSpec, OptimizerSpec, StageSpec, dump_config
from medistill.engine.checkpoint import load_checkpoint, model_state, save_checkpoint
from medistill.engine.data import GlobalBatchSampler
from medistill.engine.distributed import (
    DistInfo,
    all_reduce_mean,
    barrier,
    init_distributed,
    resolve_device,
    wrap_ddp,
)
from medistill.engine.ema import ModelEMA
from medistill.engine.logging import RunLogger, make_progress
from medistill.engine.protocol import StageTask, Stateful
from medistill.errors import MedistillError
from medistill.registry import DISTILLERS, LOSSES

#: the prefix under which a distiller with parameters (feature-KD adapters, a critic) is a model
DISTILLER_PREFIX = "distillers."


def cpu_has_bf16() -> bool:
    """Whether this CPU runs bfloat16 natively (oneDNN's check for AVX512-BF16 / AMX)."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (model initialisation is then identical on every rank)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_lambda(schedule: str, total: int, warmup: int, decay_start: float = 0.5):
    """Multiplier of the base LR at a step: linear warm-up, then constant / cosine / poly(0.9) / linear
    (constant until ``decay_start`` of the steps, then linearly to 0, as CycleGAN trains)."""

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * t)) * 0.99 + 0.01
        if schedule == "poly":
            return (1 - t) ** 0.9 * 0.99 + 0.01
        if schedule == "linear":
            return 1.0 if t < decay_start else max(0.0, (1 - t) / (1 - decay_start))
        return 1.0

    return f


@dataclass
class Term:
    """A weighted loss or distillation term of a stage."""

    weight: float
    fn: nn.Module
    spec: LossSpec

    @property
    def multiscale(self) -> bool:
        """Whether the term takes every deep-supervision output (a list), not only the finest."""
        inner = getattr(self.fn, "module", self.fn)
        return bool(getattr(inner, "multiscale", False))

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.fn(*args, **kwargs)


@dataclass
class StepContext:
    """What a task's step sees: its models, terms, the device, and how to apply a loss to an optimizer."""

    models: dict[str, nn.Module]
    frozen: dict[str, nn.Module]
    device: torch.device
    losses: dict[str, Term] = field(default_factory=dict)
    distillers: dict[str, Term] = field(default_factory=dict)
    optimizers: dict[str, torch.optim.Optimizer] = field(default_factory=dict)
    scalers: dict[str, torch.amp.GradScaler] = field(default_factory=dict)
    grad_clips: dict[str, float | None] = field(default_factory=dict)
    amp: bool = False
    cpu_bf16: bool = False
    step: int = 0
    dist: DistInfo = field(default_factory=DistInfo)
    states: dict[str, Stateful] = field(default_factory=dict)
    stage: str = ""

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Mixed precision when enabled: float16 on CUDA (``amp``), bfloat16 on CPU (``cpu_bf16``)."""
        if self.amp and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        if self.cpu_bf16 and self.device.type == "cpu":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def optimize(self, name: str, loss: torch.Tensor) -> None:
        """Backward ``loss`` and step optimizer ``name`` (zero-grad, AMP scaling, its clipping)."""
        if name not in self.optimizers:
            raise KeyError(
                f"stage {self.stage!r} has no optimizer {name!r} (has: {', '.join(self.optimizers)})"
            )
        opt = self.optimizers[name]
        scaler = self.scalers[name]
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        clip = self.grad_clips.get(name)
        if clip is not None:
            scaler.unscale_(opt)
            params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, clip)
        scaler.step(opt)
        scaler.update()

    def unwrapped(self, name: str) -> nn.Module:
        """Model ``name`` without its DDP wrapper."""
        m = self.models[name]
        return getattr(m, "module", m)

    @contextlib.contextmanager
    def frozen_params(self, *names: str) -> Iterator[nn.Module | tuple[nn.Module, ...]]:
        """Freeze models ``names`` for the other players' step (a critic during the generator step).

        Yields the unwrapped module(s) with ``requires_grad=False``: the loss flows *through* a critic into
        the generator, but no gradient is accumulated in the critic, and its DDP wrapper (which expects
        to all-reduce every parameter after a backward) is bypassed. Restored on exit.
        """
        mods = tuple(self.unwrapped(n) for n in names)
        flags = [[p.requires_grad for p in m.parameters()] for m in mods]
        for m in mods:
            m.requires_grad_(False)
        try:
            yield mods[0] if len(mods) == 1 else mods
        finally:
            for m, fl in zip(mods, flags, strict=True):
                for p, f in zip(m.parameters(), fl, strict=True):
                    p.requires_grad_(f)

    def add_state(self, name: str, obj: Stateful) -> None:
        """Checkpoint ``obj``'s ``state_dict()`` with the stage and restore it on resume."""
        if name in self.states:
            raise KeyError(f"state {name!r} is registered twice")
        self.states[name] = obj

    def total(self, terms: dict[str, Term], outputs: Any, *args: Any, **kwargs: Any) -> tuple[Any, dict]:
        """``sum_k w_k term_k(outputs or its finest scale, *args)`` and each part, detached, for logging.

        ``outputs``: a tensor, or a list of deep-supervision outputs (finest first); terms that are not
        multi-scale get only the finest. Any other positional argument that is a list (a teacher's
        multi-scale outputs) is treated the same way.
        """

        def pick(v: Any, multi: bool) -> Any:
            return v if multi or not isinstance(v, list | tuple) else v[0]

        total: Any = 0.0
        parts: dict[str, float] = {}
        for key, term in terms.items():
            m = term.multiscale
            value = term(pick(outputs, m), *(pick(a, m) for a in args), **kwargs)
            total = total + term.weight * value
            parts[key] = float(value.detach())
        return total, parts


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def build_term(spec: LossSpec, where: str) -> nn.Module:
    registry = DISTILLERS if isinstance(spec, DistillerSpec) else LOSSES
    registry.check_args(spec.name, spec.args, where)
    return registry.build(spec.name, **spec.args)


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        n = state["numpy"]
        keys = n["keys"].numpy().astype(np.uint32)
        np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    if "python" in state:
        p = state["python"]
        random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """Runs one stage of ``task`` for its steps, writing ``run_dir/<stage>/{last,best}.pt`` and logs.

    ``frozen``: the stage's frozen models, ready (loaded, eval, no gradients); ``init``: initial weights
    per trainable model (``init_from``); ``meta``: recorded in every checkpoint (training subjects, model
    specs).
    """

    def __init__(
        self,
        task: StageTask,
        run_dir: str | Path,
        stage: StageSpec,
        frozen: dict[str, nn.Module] | None = None,
        init: dict[str, dict[str, torch.Tensor]] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.task = task
        self.cfg: ExperimentConfig = task.cfg
        self.tcfg = task.cfg.train
        self.stage = stage
        self.run_dir = Path(run_dir)
        self.stage_dir = self.run_dir / stage.name
        self.frozen = frozen or {}
        self.init = init or {}
        self.meta = meta or {}
        self.steps = stage.steps or self.tcfg.steps
        self.val_every = stage.val_every or self.tcfg.val_every
        self.metric = stage.metric or task.val_metric
        self.mode = stage.mode or task.val_mode
        self.dist = init_distributed(resolve_device(self.tcfg.device))
        self.device = resolve_device(self.tcfg.device, self.dist)
        self.emas: dict[str, ModelEMA] = {}

    def ckpt_path(self, kind: str) -> Path:
        return self.stage_dir / f"{kind}.pt"

    # --- building ----------------------------------------------------------------------------------
    def _optimizer_groups(self, names: list[str]) -> dict[str, tuple[OptimizerSpec, list[str]]]:
        specs = self.stage.optimizers or {"main": OptimizerSpec()}
        claimed = {m for spec in specs.values() for m in spec.models}
        unclaimed = [n for n in names if n not in claimed]
        groups = {}
        for key, spec in specs.items():
            members = list(spec.models) or unclaimed
            groups[key] = (spec.resolved(self.tcfg), members)
        return groups

    @staticmethod
    def _make_optimizer(spec: OptimizerSpec, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        if spec.type == "sgd":
            return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
        cls = torch.optim.AdamW if spec.type == "adamw" else torch.optim.Adam
        return cls(params, lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay)

    def build(self) -> tuple[dict[str, nn.Module], StepContext, dict[str, Any]]:
        """The stage's raw (unwrapped) trainable models, its step context and its LR schedulers."""
        device, info, name = self.device, self.dist, self.stage.name
        raw: dict[str, nn.Module] = {}
        for key, spec in self.stage.models.items():
            net = self.task.build_model(key, spec)
            if key in self.init:
                net.load_state_dict(self.init[key])
            raw[key] = net.to(device)
        losses = {
            k: Term(s.weight, build_term(s, f"stages.{name}.losses.{k}").to(device), s)
            for k, s in self.stage.losses.items()
        }
        distillers = {}
        for k, s in self.stage.distillers.items():
            fn = build_term(s, f"stages.{name}.distillers.{k}").to(device)
            if any(p.requires_grad for p in fn.parameters()):
                raw[DISTILLER_PREFIX + k] = fn  # trained with the student: optimised, checkpointed, DDP
            distillers[k] = Term(s.weight, fn, s)
        models = {k: wrap_ddp(m, info, device) for k, m in raw.items()}
        for k in distillers:
            if DISTILLER_PREFIX + k in models:
                distillers[k].fn = models[DISTILLER_PREFIX + k]
        optimizers, schedulers, clips = {}, {}, {}
        for key, (spec, members) in self._optimizer_groups(list(raw)).items():
            unknown = [m for m in members if m not in raw]
            if unknown:
                raise MedistillError(
                    f"stages.{name}.optimizers.{key}.models: {unknown} are not models of the stage "
                    f"(have: {', '.join(raw)})"
                )
            params = [p for m in members for p in raw[m].parameters() if p.requires_grad]
            if not params:
                raise MedistillError(f"stages.{name}.optimizers.{key}: no trainable parameters")
            optimizers[key] = self._make_optimizer(spec, params)
            lam = lr_lambda(spec.schedule, self.steps, spec.warmup_steps, spec.decay_start)
            schedulers[key] = torch.optim.lr_scheduler.LambdaLR(optimizers[key], lam)
            clips[key] = spec.grad_clip
        use_scaler = self.tcfg.amp and device.type == "cuda"
        scalers = {k: torch.amp.GradScaler(device.type, enabled=use_scaler) for k in optimizers}
        frozen = {k: m.to(device) for k, m in self.frozen.items()}
        ctx = StepContext(
            models,
            frozen,
            device,
            losses,
            distillers,
            optimizers,
            scalers,
            clips,
            amp=self.tcfg.amp,
            cpu_bf16=self._cpu_bf16(device),
            step=0,
            dist=info,
            stage=name,
        )
        return raw, ctx, schedulers

    def _cpu_bf16(self, device: torch.device) -> bool:
        """``train.cpu_bf16`` where it applies: ``auto`` where native, ``true`` refused elsewhere."""
        if not self.tcfg.cpu_bf16 or device.type != "cpu":
            return False
        if self.tcfg.cpu_bf16 == "auto":
            return cpu_has_bf16()
        if not cpu_has_bf16():
            raise MedistillError(
                "train.cpu_bf16: this CPU has no native bfloat16 (AVX512-BF16 or AMX), where bf16 autocast "
                "is slower than float32; set train.cpu_bf16: false"
            )
        return True

    # --- the loop ----------------------------------------------------------------------------------
    def fit(self, resume: bool = True, stop_at: int | None = None) -> dict[str, Any]:
        """Train; resume from ``last.pt`` if present. ``stop_at`` ends early as if killed (tests)."""
        tcfg, info, device = self.tcfg, self.dist, self.device
        seed_everything(self.cfg.seed)
        train_set, val_set = self.task.build_data()
        if hasattr(train_set, "seed"):
            train_set.seed = self.cfg.seed
        raw_models, ctx, schedulers = self.build()
        self.task.setup_stage(ctx)
        self.emas = {k: ModelEMA(raw_models[k], d) for k, d in self.stage.ema.items()}
        for k, ema in self.emas.items():
            ctx.add_state(f"ema.{k}", ema)

        logger = RunLogger(self.stage_dir, enabled=info.is_main)
        start = 0
        best: dict[str, Any] = {"metric": self.metric, "mode": self.mode, "value": None, "step": -1}
        last = self.ckpt_path("last")
        if resume and last.exists():
            state = load_checkpoint(last)
            self._check_resumable(state, last)
            for k, m in raw_models.items():
                m.load_state_dict(state["models"][k])
            for group, objs in (
                ("optimizers", ctx.optimizers),
                ("schedulers", schedulers),
                ("scalers", ctx.scalers),
            ):
                for k, obj in objs.items():
                    obj.load_state_dict(state[group][k])
            for k, obj in ctx.states.items():
                obj.load_state_dict(state["states"][k])
            _set_rng_state(state["rng"])
            start, best = int(state["step"]), dict(state["best"])
            logger.truncate_after(start)
        if start >= self.steps:
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
        with make_progress(info.is_main and tcfg.progress) as progress:
            bar = progress.add_task(f"train {self.stage.name}", total=self.steps, completed=start, info="")
            for step in range(start, self.steps):
                if stop_at is not None and step >= stop_at:
                    break
                ctx.step = step
                for m in ctx.models.values():
                    m.train()
                logs = self.task.training_step(_to_device(next(batches), device), ctx)
                for k, ema in self.emas.items():
                    ema.update(raw_models[k])
                for s in schedulers.values():
                    s.step()
                done = step + 1
                if done % tcfg.log_every == 0 or done == self.steps:
                    logs = all_reduce_mean(logs, info, device)
                    for k, o in ctx.optimizers.items():
                        logs["lr" if len(ctx.optimizers) == 1 else f"lr_{k}"] = o.param_groups[0]["lr"]
                    logger.log(done, logs, "train")
                    shown = " ".join(f"{k}={v:.4g}" for k, v in logs.items() if not k.startswith("lr"))
                    progress.update(bar, info=shown)
                if val_loader is not None and (done % self.val_every == 0 or done == self.steps):
                    best = self._validate(raw_models, ctx, val_loader, logger, done, best)
                if done % tcfg.checkpoint_every == 0 or done == self.steps:
                    self._save_last(done, raw_models, ctx, schedulers, best)
                progress.update(bar, completed=done)
        logger.close()
        if best["step"] < 0 and info.is_main and stop_at is None:  # no validation set: last = best
            with self._averaged(raw_models):
                self._save_best(raw_models, best | {"step": self.steps})
        barrier(info)
        return {"step": self.steps, "best": best}

    def _check_resumable(self, state: dict[str, Any], path: Path) -> None:
        total = state.get("total_steps")
        if total is None or total == self.steps:
            return
        scheduled = [
            k
            for k, (spec, _) in self._optimizer_groups(list(state["models"])).items()
            if spec.schedule != "constant"
        ]
        if scheduled:
            raise MedistillError(
                f"{path}: stage {self.stage.name!r} was trained with LR schedules over {total} steps; "
                f"continuing it with steps={self.steps} would restart the schedule of optimizer "
                f"{scheduled[0]!r} mid-way. Set its steps back to {total}, or pass --overwrite to retrain it"
            )

    @contextlib.contextmanager
    def _averaged(self, raw_models: dict[str, nn.Module]) -> Iterator[None]:
        """The models with ``ema`` hold their averaged weights inside the block (validation, best.pt)."""
        with contextlib.ExitStack() as stack:
            for k, ema in self.emas.items():
                stack.enter_context(ema.applied(raw_models[k]))
            yield

    def _validate(self, raw_models, ctx, loader, logger, step, best) -> dict[str, Any]:
        with self._averaged(raw_models):
            return self._validate_models(raw_models, ctx, loader, logger, step, best)

    def _validate_models(self, raw_models, ctx, loader, logger, step, best) -> dict[str, Any]:
        if self.dist.is_main:
            for m in raw_models.values():
                m.eval()
            vctx = StepContext(
                raw_models,
                ctx.frozen,
                self.device,
                ctx.losses,
                ctx.distillers,
                amp=ctx.amp,
                cpu_bf16=ctx.cpu_bf16,
                step=step,
                dist=self.dist,
                stage=self.stage.name,
            )
            with torch.no_grad():
                metrics = self.task.validate(vctx, loader)
            logger.log(step, metrics, "val")
            value = metrics.get(self.metric)
            if value is None:
                raise MedistillError(
                    f"stage {self.stage.name!r}: validation gave no metric {self.metric!r} "
                    f"(has: {', '.join(metrics)})"
                )
            better = best["value"] is None or (
                value > best["value"] if self.mode == "max" else value < best["value"]
            )
            if better:
                best = best | {"value": float(value), "step": step}
                self._save_best(raw_models, best)
        barrier(self.dist)
        return best

    def _base_state(self, raw_models) -> dict[str, Any]:
        return {
            "task": self.cfg.task,
            "stage": self.stage.name,
            "config": dump_config(self.cfg),
            "models": {k: model_state(m) for k, m in raw_models.items()},
            "total_steps": self.steps,
            **self.meta,
        }

    def _save_best(self, raw_models, best) -> None:
        save_checkpoint(
            self._base_state(raw_models) | {"step": best["step"], "best": best}, self.ckpt_path("best")
        )

    def _save_last(self, step, raw_models, ctx, schedulers, best) -> None:
        if not self.dist.is_main:
            return
        state = self._base_state(raw_models) | {
            "step": step,
            "best": best,
            "optimizers": {k: o.state_dict() for k, o in ctx.optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in schedulers.items()},
            "scalers": {k: s.state_dict() for k, s in ctx.scalers.items()},
            "states": {k: obj.state_dict() for k, obj in ctx.states.items()},
            "rng": _rng_state(),
        }
        save_checkpoint(state, self.ckpt_path("last"))
