"""Experiment configuration: one YAML file per experiment, validated by pydantic.

Every experiment names its ``task`` (a key of :data:`medistill.registry.TASKS`); the task class carries
the pydantic schema of its whole config (``Task.Config``, a subclass of :class:`ExperimentConfig`).
Unknown keys are refused with their dotted path and the closest valid names, and ``--set a.b=c``
overrides from the command line are applied before validation (values parsed as YAML scalars).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medistill.errors import MedistillError


class StrictModel(BaseModel):
    """A config section: unknown keys are errors, values are validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class TrainConfig(StrictModel):
    """The training loop, shared by every task (see :mod:`medistill.engine.trainer`)."""

    steps: int = Field(1000, gt=0, description="optimizer steps in total")
    batch_size: int = Field(8, gt=0, description="global batch size (split across DDP ranks)")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    lr_schedule: Literal["constant", "cosine", "poly"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0, description="max gradient norm per optimizer; null = off")
    amp: bool = Field(True, description="mixed precision on CUDA (ignored on CPU)")
    val_every: int = Field(100, gt=0)
    log_every: int = Field(10, gt=0)
    checkpoint_every: int = Field(100, gt=0)
    num_workers: int = Field(0, ge=0)
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    progress: bool = True


class ExperimentConfig(StrictModel):
    """Fields every experiment has; tasks extend it with their own sections."""

    name: str = "experiment"
    task: str
    seed: int = 0
    train: TrainConfig = TrainConfig()


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides to a nested dict (values parsed as YAML: ``1e-3``, ``true``, ``[1,2]``)."""
    for item in overrides:
        if "=" not in item:
            raise MedistillError(f"override {item!r} is not of the form key.path=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise MedistillError(f"override {item!r}: {where} is a value, not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(value)
    return raw


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the (sub)model reached by ``loc`` (for suggestions on unknown keys)."""
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        sub = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if sub is None:
            return []
        model = sub
    return list(model.model_fields)


def format_validation_error(exc: ValidationError, model: type[BaseModel], source: str) -> str:
    """One readable line per problem: ``source: train.lrr: unknown key (did you mean lr?)``."""
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        path = ".".join(str(p) for p in loc) or "<root>"
        if err["type"] == "extra_forbidden":
            valid = _fields_at(model, loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), valid, n=3, cutoff=0.5)
            hint = f" (did you mean {', '.join(close)}?)" if close else f" (valid: {', '.join(valid)})"
            lines.append(f"{source}: {path}: unknown key{hint}")
        else:
            value = err.get("input")
            shown = "" if isinstance(value, dict) else f" (got {value!r})"
            lines.append(f"{source}: {path}: {err['msg']}{shown}")
    return "; ".join(lines)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors naming the file."""
    p = Path(path)
    if not p.is_file():
        raise MedistillError(f"config file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise MedistillError(f"{p}: not valid YAML: {exc}".replace("\n", " ")) from exc
    if not isinstance(raw, dict):
        raise MedistillError(f"{p}: expected a mapping of sections at the top level")
    return raw


def validate_config(raw: dict[str, Any], source: str = "config") -> ExperimentConfig:
    """Validate a raw config dict with the schema of its task."""
    from medistill.registry import TASKS

    task_name = raw.get("task")
    if not task_name:
        raise MedistillError(f"{source}: missing key 'task' (one of: {', '.join(TASKS.names())})")
    task_cls = TASKS.get(str(task_name))
    schema: type[ExperimentConfig] = task_cls.Config
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        raise MedistillError(format_validation_error(exc, schema, source)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read, override and validate an experiment YAML."""
    raw = apply_overrides(read_yaml(path), overrides or [])
    return validate_config(raw, source=str(path))


def dump_config(cfg: BaseModel) -> str:
    """The config as YAML text (stored in every run folder and checkpoint)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
