"""The declarative stage runner: pretrain -> teacher -> student, from the experiment's ``stages:`` list.

Each stage (:class:`~medistill.config.StageSpec`) names its trainable models (registry key + typed
arguments, optionally initialised from an earlier stage's best weights), the frozen models it takes from
earlier stages or checkpoint files, its losses and distillers, its optimizers (one per model group,
each with its own LR schedule), steps, validation interval and metric. The runner

* validates the whole experiment before any work: stage names, references to earlier stages,
  every model / loss / distiller name and argument against the registries' signatures, the optimizer
  groups, and that multi-scale distillers pair a student and a teacher with equal numbers of scales;
* writes ``RUN/splits.json`` and records in every checkpoint the subjects the stage trained on, and
  refuses a frozen model whose training subjects include one of this run's test subjects;
* runs the stages in order, skipping finished ones and resuming an interrupted one exactly
  (:class:`~medistill.engine.trainer.Trainer`), each in ``RUN/<stage>/``.

It knows no medicine: the task is reached only through :class:`~medistill.engine.protocol.StageTask`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from medistill.config import (
    ExperimentConfig,
    FrozenSpec,
    ModelSpec,
    StageSpec,
    apply_overrides,
    validate_config,
)
from medistill.engine.checkpoint import load_checkpoint
from medistill.engine.distributed import cleanup, init_distributed, resolve_device
from medistill.engine.protocol import StageTask
from medistill.engine.trainer import Trainer, build_term
from medistill.errors import MedistillError
from medistill.io.atomic import atomic_write_text
from medistill.registry import DISTILLERS, NETS

TaskFactory = Callable[[ExperimentConfig, Path], StageTask]


def subjects_hash(ids: list[str]) -> str:
    """A short, order-independent fingerprint of a list of subject ids."""
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:16]


def _set_key(overrides: dict[str, Any]) -> str:
    """Stages with the same ``set`` overrides share one configuration and one task instance."""
    return json.dumps(overrides, sort_keys=True, default=str)


def _ref(ref: str, default_model: str) -> tuple[str, str]:
    stage, _, model = ref.partition(".")
    return stage, model or default_model


class StageRunner:
    """Runs the ``stages`` of one experiment in ``run_dir`` (see the module docstring)."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        run_dir: str | Path,
        make_task: TaskFactory,
        task: StageTask | None = None,
    ) -> None:
        """``task``: an existing task of ``cfg`` to serve the stages without ``set`` overrides."""
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.make_task = make_task
        self._configs: dict[str, ExperimentConfig] = {_set_key({}): cfg}
        self._tasks: dict[str, StageTask] = {} if task is None else {_set_key({}): task}
        if not cfg.stages:
            raise MedistillError(f"experiment {cfg.name!r} (task {cfg.task}) has no stages to run")
        self.stages = {s.name: s for s in cfg.stages}
        self.order = [s.name for s in cfg.stages]

    # --- configuration -----------------------------------------------------------------------------
    def stage(self, name: str) -> StageSpec:
        if name not in self.stages:
            raise MedistillError(f"no stage {name!r} in {self.cfg.name} (stages: {', '.join(self.order)})")
        return self.stages[name]

    def stage_config(self, stage: StageSpec) -> ExperimentConfig:
        """The experiment as this stage sees it: its ``set`` overrides applied and validated (once)."""
        key = _set_key(stage.set)
        if key not in self._configs:
            raw = yaml.safe_load(yaml.safe_dump(self.cfg.model_dump(mode="json")))
            overrides = [f"{k}={json.dumps(v)}" for k, v in stage.set.items()]
            try:
                raw = apply_overrides(raw, overrides)
            except MedistillError as exc:
                raise MedistillError(f"stages.{stage.name}.set: {exc}") from None
            self._configs[key] = validate_config(raw, source=f"stages.{stage.name}.set")
        return self._configs[key]

    def task(self, stage: StageSpec) -> StageTask:
        """The task of ``stage`` (one instance per distinct configuration, so data is prepared once)."""
        key = _set_key(stage.set)
        if key not in self._tasks:
            self._tasks[key] = self.make_task(self.stage_config(stage), self.run_dir)
        return self._tasks[key]

    def model_spec(self, ref_stage: str, model: str, where: str) -> ModelSpec:
        spec = self.stage(ref_stage).models.get(model)
        if spec is None:
            have = ", ".join(self.stage(ref_stage).models)
            raise MedistillError(f"{where}: stage {ref_stage!r} has no model {model!r} (has: {have})")
        return spec

    def validate(self) -> None:
        """Check the whole experiment before any work; fail with the dotted path of the first problem."""
        seen: list[str] = []
        for stage in self.cfg.stages:
            where = f"stages.{stage.name}"
            if stage.name in seen:
                raise MedistillError(f"{where}: two stages are called {stage.name!r}")
            task = self.task(stage)
            for key, spec in stage.models.items():
                NETS.check_args(spec.name, spec.args, f"{where}.models.{key}", task.supplied_args(key, spec))
                if spec.init_from:
                    src, model = _ref(spec.init_from, key)
                    if src not in seen:
                        raise MedistillError(
                            f"{where}.models.{key}.init_from: {src!r} is not an earlier stage"
                        )
                    self.model_spec(src, model, f"{where}.models.{key}.init_from")
            for key, fz in stage.frozen.items():
                if fz.stage is not None:
                    if fz.stage not in seen:
                        raise MedistillError(
                            f"{where}.frozen.{key}.stage: {fz.stage!r} is not an earlier stage "
                            f"(earlier: {', '.join(seen) or 'none'})"
                        )
                    self.model_spec(fz.stage, fz.model, f"{where}.frozen.{key}")
            for group in ("losses", "distillers"):
                for key, spec in getattr(stage, group).items():
                    build_term(spec, f"{where}.{group}.{key}")
            for key, spec in stage.distillers.items():
                if spec.student not in stage.models:
                    raise MedistillError(
                        f"{where}.distillers.{key}.student: {spec.student!r} is not a model of the stage"
                    )
                if spec.teacher not in stage.frozen:
                    raise MedistillError(
                        f"{where}.distillers.{key}.teacher: {spec.teacher!r} is not a frozen model "
                        "of the stage"
                    )
            self._check_scales(stage, task)
            for key, opt in stage.optimizers.items():
                names = set(stage.models) | {f"distillers.{k}" for k in stage.distillers}
                unknown = [m for m in opt.models if m not in names]
                if unknown:
                    raise MedistillError(
                        f"{where}.optimizers.{key}.models: {unknown} are not models of the stage"
                    )
            seen.append(stage.name)
        for ref in self.cfg.export or []:
            st, model = _ref(ref, "net")
            self.model_spec(st, model, f"export: {ref}")

    def _frozen_spec(self, fz: FrozenSpec, state: dict[str, Any] | None = None) -> tuple[str, ModelSpec]:
        """The model spec of a frozen model: from its stage, or recorded in its checkpoint file (``state``,
        when the caller has loaded it already)."""
        if fz.stage is not None:
            return fz.model, self.model_spec(fz.stage, fz.model, "frozen")
        state = state if state is not None else load_checkpoint(fz.checkpoint)
        specs = state.get("model_specs", {})
        if fz.model not in specs:
            raise MedistillError(
                f"{fz.checkpoint}: no model {fz.model!r} with its spec in the checkpoint "
                f"(has: {', '.join(specs) or 'none'})"
            )
        return fz.model, ModelSpec.model_validate(specs[fz.model])

    def _check_scales(self, stage: StageSpec, task: StageTask) -> None:
        """Multi-scale distillers pair scales one to one: refuse unequal numbers of scales."""
        for key, spec in stage.distillers.items():
            if not getattr(DISTILLERS.get(spec.name), "multiscale", False):
                continue
            student = task.build_model(spec.student, stage.models[spec.student], probe=True)
            fz = stage.frozen[spec.teacher]
            if fz.stage is None and not fz.checkpoint.is_file():
                raise MedistillError(
                    f"stages.{stage.name}.frozen.{spec.teacher}.checkpoint: {fz.checkpoint} not found"
                )
            name, tspec = self._frozen_spec(fz)
            teacher = task.build_model(name, tspec, probe=True)
            n_s = int(getattr(student, "n_scales", 1))
            n_t = int(getattr(teacher, "n_scales", 1)) if fz.scales else 1
            if n_s != n_t:
                raise MedistillError(
                    f"stages.{stage.name}.distillers.{key}: {spec.name} pairs scales one to one, but the "
                    f"student {stage.models[spec.student].name} gives {n_s} scale(s) and the teacher "
                    f"{tspec.name} {n_t}" + ("" if fz.scales else f" (frozen.{spec.teacher}.scales is false)")
                )

    # --- splits ------------------------------------------------------------------------------------
    def splits(self) -> dict[str, list[str]]:
        return self.task(self.cfg.stages[0]).splits()

    def write_splits(self) -> dict[str, list[str]]:
        splits = self.splits()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_dir / "splits.json", json.dumps(splits, indent=2) + "\n")
        return splits

    def _check_overlap(self, state: dict[str, Any], source: str, where: str) -> None:
        trained = set(state.get("train_subjects", []))
        test = set(self.splits().get("test", []))
        overlap = sorted(trained & test)
        if overlap:
            shown = ", ".join(overlap[:5]) + (" ..." if len(overlap) > 5 else "")
            raise MedistillError(
                f"{where}: {source} was trained on {len(overlap)} of this run's test subjects ({shown}); "
                "a teacher must not have seen the test set"
            )

    # --- loading -----------------------------------------------------------------------------------
    def ckpt(self, stage: str, which: str = "best") -> Path:
        return self.run_dir / stage / f"{which}.pt"

    def load_model(self, stage: str, model: str = "net", which: str = "best") -> nn.Module:
        """Model ``model`` of a trained ``stage`` (eval mode), built by that stage's task."""
        spec = self.stage(stage)
        state = load_checkpoint(self.ckpt(stage, which))
        if model not in state["models"]:
            raise MedistillError(f"{self.ckpt(stage, which)}: no weights for model {model!r}")
        net = self.task(spec).build_model(model, self.model_spec(stage, model, f"stages.{stage}"))
        net.load_state_dict(state["models"][model])
        return net.eval()

    def _frozen_models(self, stage: StageSpec) -> dict[str, nn.Module]:
        from medistill.distill.teacher import FrozenTeacher

        out = {}
        for key, fz in stage.frozen.items():
            where = f"stages.{stage.name}.frozen.{key}"
            path = self.ckpt(fz.stage) if fz.stage is not None else fz.checkpoint
            if not Path(path).is_file():
                raise MedistillError(f"{where}: {path} not found (train stage {fz.stage!r} first)")
            state = load_checkpoint(path)
            self._check_overlap(state, str(path), where)
            name, spec = self._frozen_spec(fz, state)
            net = self.task(stage).build_model(name, spec)
            if name not in state["models"]:
                raise MedistillError(f"{where}: {path} has no weights for model {name!r}")
            try:
                net.load_state_dict(state["models"][name])
            except RuntimeError as exc:
                raise MedistillError(
                    f"{where}: {path} does not fit {spec.name}: {str(exc).splitlines()[0]}"
                ) from exc
            out[key] = FrozenTeacher(net, fz.features, multiscale=fz.scales)
        return out

    def _init_weights(self, stage: StageSpec) -> dict[str, dict[str, torch.Tensor]]:
        init = {}
        for key, spec in stage.models.items():
            if spec.init_from:
                src, model = _ref(spec.init_from, key)
                init[key] = load_checkpoint(self.ckpt(src))["models"][model]
        return init

    # --- running -----------------------------------------------------------------------------------
    def is_finished(self, name: str) -> bool:
        last = self.ckpt(name, "last")
        if not last.exists():
            return False
        spec = self.stage(name)
        steps = spec.steps or self.stage_config(spec).train.steps
        return int(load_checkpoint(last).get("step", 0)) >= steps

    def run(self, only: str | None = None, stop_at: int | None = None) -> dict[str, Any]:
        """Run every stage in order (or ``only`` one), skipping finished ones; returns each one's result."""
        self.validate()
        names = [self.stage(only).name] if only else self.order
        splits = self.write_splits()
        meta_subjects = {
            "train_subjects": splits.get("train", []),
            "train_hash": subjects_hash(splits.get("train", [])),
        }
        results: dict[str, Any] = {}
        info = init_distributed(resolve_device(self.cfg.train.device))
        try:
            for name in names:
                stage = self.stage(name)
                if self.is_finished(name):
                    results[name] = {"skipped": "finished"}
                    continue
                task = self.task(stage)
                meta = meta_subjects | {
                    "model_specs": {k: m.model_dump(mode="json") for k, m in stage.models.items()}
                }
                trainer = Trainer(
                    task, self.run_dir, stage, self._frozen_models(stage), self._init_weights(stage), meta
                )
                results[name] = trainer.fit(stop_at=stop_at)
        finally:
            cleanup(info)
        return results

    def deployables(self) -> list[tuple[str, str]]:
        """``(stage, model)`` of every network ``export``/``bench`` deploy, in stage order."""
        if self.cfg.export is not None:
            return [_ref(r, "net") for r in self.cfg.export]
        return [(s.name, next(iter(s.models))) for s in self.cfg.stages]
