"""The task contract: what a system (segmentation, registration, MAR, ...) gives the engine.

A task is registered in :data:`medistill.registry.TASKS`; its ``Config`` is the pydantic schema of
its experiment YAML. The engine calls, in order: :meth:`build_data`, :meth:`build_models`,
:meth:`build_frozen`, :meth:`build_optimizers`, then :meth:`training_step` per step and
:meth:`validate` every ``train.val_every`` steps. ``medistill predict/evaluate/export`` call
:meth:`load` and the task's own functions.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch.utils.data import Dataset

from medistill.config import ExperimentConfig

if TYPE_CHECKING:
    from medistill.engine.trainer import StepContext


class Task(ABC):
    """Base class of every task; subclasses set ``Config`` and implement the abstract methods."""

    Config: ClassVar[type[ExperimentConfig]] = ExperimentConfig
    val_metric: ClassVar[str] = "loss"
    val_mode: ClassVar[Literal["min", "max"]] = "min"

    def __init__(self, cfg: ExperimentConfig, run_dir: str | Path) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)

    @abstractmethod
    def build_data(self) -> tuple[Dataset, Dataset | None]:
        """Training set (a :class:`~medistill.engine.data.KeyedDataset`) and validation set or None."""

    @abstractmethod
    def build_models(self) -> dict[str, torch.nn.Module]:
        """The trainable networks, by name (each is wrapped in DDP when distributed)."""

    def build_frozen(self) -> dict[str, torch.nn.Module]:
        """Frozen networks (teachers): never wrapped, never optimised."""
        return {}

    def build_optimizers(self, models: dict[str, torch.nn.Module]) -> dict[str, torch.optim.Optimizer]:
        """Default: one AdamW over every trainable network, named ``main``."""
        params = [p for m in models.values() for p in m.parameters() if p.requires_grad]
        t = self.cfg.train
        return {"main": torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)}

    @abstractmethod
    def training_step(self, batch: Any, ctx: StepContext) -> dict[str, float]:
        """Compute losses, call ``ctx.optimize(name, loss)`` for each optimizer, return scalar logs."""

    @abstractmethod
    def validate(self, ctx: StepContext, loader: Any) -> dict[str, float]:
        """Metrics on the validation set; must include :attr:`val_metric`."""

    # --- after training: used by ``medistill evaluate / predict / export / report`` -------------------

    def load_models(self, which: str = "best", stage: str = "") -> dict[str, torch.nn.Module]:
        """Rebuild the trainable networks and load their weights from ``RUN/[stage_]{which}.pt``."""
        from medistill.engine.checkpoint import load_checkpoint

        name = f"{stage + '_' if stage else ''}{which}.pt"
        state = load_checkpoint(self.run_dir / name)
        models = self.build_models()
        for key, model in models.items():
            if key not in state["models"]:
                from medistill.errors import MedistillError

                raise MedistillError(f"{self.run_dir / name}: no weights for model {key!r}")
            model.load_state_dict(state["models"][key])
            model.eval()
        return models

    def evaluate(self, models: dict[str, torch.nn.Module], out_dir: Path) -> dict[str, Any]:
        """Metrics on the held-out test data (``{"cases": {case: {metric: value}}, ...}``) + figures."""
        from medistill.errors import MedistillError

        raise MedistillError(f"task {self.cfg.task!r} has no evaluation")

    def predict_file(self, models: dict[str, torch.nn.Module], src: Path, dst: Path) -> Path:
        """Run the trained model on one input file and write the result in the input's geometry."""
        from medistill.errors import MedistillError

        raise MedistillError(f"task {self.cfg.task!r} does not predict on files")

    def example_inputs(self) -> dict[str, torch.Tensor]:
        """One example input per exportable network (``medistill export`` traces with these)."""
        from medistill.errors import MedistillError

        raise MedistillError(f"task {self.cfg.task!r} does not export networks")
