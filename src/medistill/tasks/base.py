"""The task contract: what a system (segmentation, registration, MAR, ...) gives the engine and the CLI.

A task is registered in :data:`medistill.registry.TASKS`; its ``Config`` is the pydantic schema of its
experiment YAML, whose ``stages:`` list the engine runs (:mod:`medistill.engine.stages`). A task
implements the engine's protocol (:class:`medistill.engine.protocol.StageTask`): :meth:`build_data`,
:meth:`build_model`, :meth:`training_step`, :meth:`validate`, :meth:`splits`; and, for the verbs after
training, :meth:`evaluate`, :meth:`predict_file`, :meth:`deploy_inputs`, :meth:`whole_input` and
:meth:`whole_inference`. Trained networks are loaded with :meth:`stage_model`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from medistill.config import ExperimentConfig, ModelSpec
from medistill.errors import MedistillError
from medistill.registry import NETS, TASKS

if TYPE_CHECKING:
    from medistill.engine.stages import StageRunner
    from medistill.engine.trainer import StepContext

#: ``{input name: tensor}`` -> output, by PyTorch or onnxruntime (see :mod:`medistill.deploy.profile`)
Predictor = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def require_divisible(net: torch.nn.Module, shape: Sequence[int], field: str, name: str) -> None:
    """Refuse an input ``shape`` (the config ``field``) that network ``name`` cannot take: every axis must
    be a multiple of the net's ``divisor`` (its total down-sampling, per axis or one number)."""
    div = np.broadcast_to(np.asarray(getattr(net, "divisor", 1)), (len(shape),))
    if any(int(s) % int(d) for s, d in zip(shape, div, strict=True)):
        raise MedistillError(
            f"{field} {tuple(shape)} must be divisible by {tuple(int(d) for d in div)} for {name}"
        )


def make_task(cfg: ExperimentConfig, run_dir: Path) -> Task:
    """The task object of an experiment (by its ``task`` key)."""
    return TASKS.get(cfg.task)(cfg, run_dir)


class Task(ABC):
    """Base class of every task; subclasses set ``Config`` and implement the abstract methods."""

    Config: ClassVar[type[ExperimentConfig]] = ExperimentConfig
    val_metric: ClassVar[str] = "loss"
    val_mode: ClassVar[Literal["min", "max"]] = "min"

    def __init__(self, cfg: ExperimentConfig, run_dir: str | Path) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self._runner: StageRunner | None = None

    # --- the engine's protocol ---------------------------------------------------------------------
    @abstractmethod
    def build_data(self) -> tuple[Dataset, Dataset | None]:
        """Training set (a :class:`~medistill.engine.data.KeyedDataset`) and validation set or None."""

    def net_args(self, key: str, spec: ModelSpec, probe: bool = False) -> dict[str, Any]:
        """Constructor arguments the task supplies to model ``key`` (channels, classes, dims)."""
        return {}

    def build_model(self, key: str, spec: ModelSpec, probe: bool = False) -> torch.nn.Module:
        """The registered network ``spec.name`` with the task's arguments and the YAML's ``args``."""
        return NETS.build(spec.name, **self.net_args(key, spec, probe), **spec.args)

    def supplied_args(self, key: str, spec: ModelSpec) -> set[str]:
        return set(self.net_args(key, spec, probe=True))

    def setup_stage(self, ctx: StepContext) -> None:
        """Register extra training state with ``ctx.add_state`` (image pools, EMA); none by default."""
        return None

    @abstractmethod
    def training_step(self, batch: Any, ctx: StepContext) -> dict[str, float]:
        """Compute losses, call ``ctx.optimize(name, loss)`` for each optimizer, return scalar logs."""

    @abstractmethod
    def validate(self, ctx: StepContext, loader: Any) -> dict[str, float]:
        """Metrics on the validation set; must include the stage's metric."""

    @abstractmethod
    def splits(self) -> dict[str, list[str]]:
        """Subject or case ids of each split (``train``, ``val``, ``test``), for ``RUN/splits.json``."""

    # --- stages of this run ------------------------------------------------------------------------
    @property
    def runner(self) -> StageRunner:
        """The stage runner of this run (shares this task for the stages that need no overrides)."""
        if self._runner is None:
            from medistill.engine.stages import StageRunner

            self._runner = StageRunner(self.cfg, self.run_dir, make_task, task=self)
        return self._runner

    def stage_names(self, trained_only: bool = True) -> list[str]:
        names = [s.name for s in self.cfg.stages]
        return [n for n in names if not trained_only or self.runner.ckpt(n).exists()]

    def stage_model(self, stage: str, model: str = "net", which: str = "best") -> torch.nn.Module:
        """Model ``model`` of the trained ``stage``, in eval mode."""
        return self.runner.load_model(stage, model, which)

    def predict_model(self) -> torch.nn.Module:
        """The network ``predict`` uses: the last deployable one (the distilled student)."""
        return self.stage_model(*self.runner.deployables()[-1])

    # --- after training: ``medistill evaluate / predict / export / bench / report`` ----------------
    def evaluate(self, out_dir: Path) -> dict[str, Any]:
        """Metrics on the held-out test data (``{"cases": {case: {metric: value}}, ...}``) + figures."""
        raise MedistillError(f"task {self.cfg.task!r} has no evaluation")

    def predict_file(self, src: Path, dst: Path) -> Path:
        """Run the trained model on one input file and write the result in the input's geometry."""
        raise MedistillError(f"task {self.cfg.task!r} does not predict on files")

    def deploy_inputs(self, stage: str, model: str) -> dict[str, torch.Tensor]:
        """Named inputs of a deployable network, at its training size, from the run's real data
        (``medistill export`` traces and checks parity with these)."""
        raise MedistillError(f"task {self.cfg.task!r} does not export networks")

    def whole_input(self, stage: str, model: str) -> tuple[str, dict[str, torch.Tensor]]:
        """A description and the named inputs of one whole case as deployed (``medistill bench``):
        by default the export inputs."""
        return "training-size input", self.deploy_inputs(stage, model)

    def whole_inference(self, predict: Predictor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """How one whole case is run with a predictor (a sliding window for 3D patches); default: once."""
        return predict(inputs)

    def dynamic_spatial(self, stage: str, model: str) -> bool:
        """Whether the exported network takes any spatial size (fully convolutional nets do)."""
        return True

    def deploy_contract(self, stage: str, model: str) -> dict[str, Any]:
        """The preprocessing contract of an exported network (``medistill export`` stores it in the ONNX
        ``metadata_props`` and a JSON beside it), so a deployment need not rebuild it from config.yaml.
        Tasks add their HU window or normalisation, spacing, orientation, labels and thresholds."""
        return {"task": self.cfg.task, "experiment": self.cfg.name, "stage": stage, "model": model}
