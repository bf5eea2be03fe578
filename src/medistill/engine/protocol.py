"""What the engine needs from a task: a small protocol, so the engine imports nothing from ``tasks/``.

A task (segmentation, registration, MAR, ...) knows its data, how to build a network for a role, one
training step and its validation. The engine (:mod:`medistill.engine.stages`,
:mod:`medistill.engine.trainer`) knows stages, optimizers, checkpoints, DDP and logging, and nothing
medical. :class:`medistill.tasks.base.Task` implements this protocol.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch.utils.data import Dataset

from medistill.config import ExperimentConfig, ModelSpec

if TYPE_CHECKING:
    from medistill.engine.trainer import StepContext


@runtime_checkable
class Stateful(Protocol):
    """Training state a resume needs besides models and optimizers (image pools, EMA weights)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


class StageTask(Protocol):
    """The task side of one stage."""

    cfg: ExperimentConfig
    run_dir: Path
    #: the default validation metric (a key of :meth:`validate`'s result) and whether higher is better
    val_metric: str
    val_mode: str

    def build_data(self) -> tuple[Dataset, Dataset | None]:
        """Training set (a :class:`~medistill.engine.data.KeyedDataset`) and validation set or None."""
        ...

    def build_model(self, key: str, spec: ModelSpec, probe: bool = False) -> torch.nn.Module:
        """The network ``spec`` names, with the arguments the task supplies (channels, classes).

        ``probe``: built only to check the configuration before any work (placeholder class counts).
        """
        ...

    def supplied_args(self, key: str, spec: ModelSpec) -> set[str]:
        """The constructor arguments :meth:`build_model` passes itself (so the YAML must not)."""
        ...

    def setup_stage(self, ctx: StepContext) -> None:
        """Register extra stateful objects (``ctx.add_state``) before the first step; may do nothing."""
        ...

    def training_step(self, batch: Any, ctx: StepContext) -> dict[str, float]:
        """Compute losses, call ``ctx.optimize(name, loss)`` per optimizer, return scalar logs."""
        ...

    def validate(self, ctx: StepContext, loader: Any) -> dict[str, float]:
        """Metrics on the validation set (models in eval mode, under ``no_grad``)."""
        ...

    def splits(self) -> dict[str, list[str]]:
        """Subject (or case) ids of each split: ``{"train": [...], "val": [...], "test": [...]}``."""
        ...
