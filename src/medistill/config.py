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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

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
    cpu_bf16: bool | Literal["auto"] = Field(
        False,
        description="bfloat16 autocast of the forward passes on CPU (about 2x on CPUs with AVX512-BF16 or "
        "AMX; losses stay fp32): true refuses a CPU without native bf16 (it would be slower there), 'auto' "
        "uses it only where native",
    )
    val_every: int = Field(100, gt=0)
    log_every: int = Field(10, gt=0)
    checkpoint_every: int = Field(100, gt=0)
    num_workers: int = Field(0, ge=0)
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    progress: bool = True


Schedule = Literal["constant", "cosine", "poly", "linear"]


class ComponentSpec(StrictModel):
    """A registry key and its typed constructor arguments (checked against the registered signature)."""

    name: str = Field(description="registry key (medistill.registry: NETS, LOSSES or DISTILLERS)")
    args: dict[str, Any] = Field({}, description="constructor arguments")


class ModelSpec(ComponentSpec):
    """A trainable model of a stage (a network, a critic, a discriminator)."""

    init_from: str | None = Field(
        None, description="'STAGE' or 'STAGE.MODEL': start from that earlier stage's best weights"
    )


class FrozenSpec(StrictModel):
    """A frozen model taken from an earlier stage (or a checkpoint file): eval mode, no gradients."""

    stage: str | None = Field(None, description="an earlier stage of this experiment")
    model: str = Field("net", description="the model's name in that stage")
    checkpoint: Path | None = Field(None, description="or a medistill checkpoint file (instead of stage)")
    scales: bool = Field(False, description="return every deep-supervision output (multi-scale KD)")
    features: list[str] = Field([], description="submodules whose outputs are hooked (feature KD)")

    @model_validator(mode="after")
    def _one_source(self) -> FrozenSpec:
        if (self.stage is None) == (self.checkpoint is None):
            raise ValueError("give exactly one of stage (an earlier stage) or checkpoint (a file)")
        return self


class LossSpec(ComponentSpec):
    """A weighted loss term."""

    weight: float = Field(1.0, ge=0)


class DistillerSpec(LossSpec):
    """A weighted distillation term between a trainable student and a frozen teacher of the stage."""

    student: str = Field("net", description="the stage's trainable model that is distilled")
    teacher: str = Field("teacher", description="the stage's frozen model it learns from")


class OptimizerSpec(StrictModel):
    """One optimizer over a group of the stage's trainable models, with its own LR schedule.

    Unset fields take the value of the experiment's ``train`` section.
    """

    models: list[str] = Field(
        [], description="the models it optimises (default: every model no other optimizer names)"
    )
    type: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = Field(0.9, ge=0, description="SGD only")
    weight_decay: float = Field(0.0, ge=0)
    schedule: Schedule = "cosine"
    warmup_steps: int = Field(0, ge=0)
    decay_start: float = Field(0.5, ge=0, lt=1, description="'linear': fraction of steps before the decay")
    grad_clip: float | None = Field(1.0, gt=0, description="max gradient norm; null = off")

    def resolved(self, train: TrainConfig) -> OptimizerSpec:
        """This spec with every field the YAML left unset taken from ``train``."""
        inherit = {
            "lr": train.lr,
            "weight_decay": train.weight_decay,
            "schedule": train.lr_schedule,
            "warmup_steps": train.warmup_steps,
            "grad_clip": train.grad_clip,
        }
        return self.model_copy(update={k: v for k, v in inherit.items() if k not in self.model_fields_set})


class StageSpec(StrictModel):
    """One stage of an experiment (pretrain, teacher, student, ...): what it trains and from what.

    ``set`` overrides other sections of the experiment for this stage only (``{"data.method": "x"}``),
    validated like the YAML itself; ``steps``, ``val_every`` and ``metric`` default to ``train``'s and the
    task's.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="the stage's folder in the run")
    models: dict[str, ModelSpec] = Field(min_length=1, description="trainable models by name")
    frozen: dict[str, FrozenSpec] = {}
    losses: dict[str, LossSpec] = {}
    distillers: dict[str, DistillerSpec] = {}
    optimizers: dict[str, OptimizerSpec] = Field(
        {}, description="by name; default one 'main' optimizer over every model"
    )
    steps: int | None = Field(None, gt=0, description="default train.steps")
    val_every: int | None = Field(None, gt=0, description="default train.val_every")
    metric: str | None = Field(None, description="validation metric for best.pt (default: the task's)")
    mode: Literal["min", "max"] | None = None
    set: dict[str, Any] = Field({}, description="dotted overrides of other sections, for this stage")
    ema: dict[str, float] = Field(
        {},
        description="{model: decay}: validate and save best.pt with an exponential moving average of the "
        "model's weights (last.pt keeps the raw weights and the average, for an exact resume)",
    )

    @model_validator(mode="after")
    def _check_ema(self) -> StageSpec:
        for key, decay in self.ema.items():
            if key not in self.models:
                raise ValueError(
                    f"ema.{key}: not a trainable model of the stage (have: {', '.join(self.models)})"
                )
            if not 0.0 < decay < 1.0:
                raise ValueError(f"ema.{key}: decay {decay} must lie in (0, 1)")
        return self


class ExperimentConfig(StrictModel):
    """Fields every experiment has; tasks extend it with their own sections."""

    name: str = "experiment"
    task: str
    seed: int = 0
    train: TrainConfig = TrainConfig()
    stages: list[StageSpec] = Field([], description="run in order by `medistill run` (engine/stages.py)")
    export: list[str] | None = Field(
        None, description="'STAGE.MODEL' networks that `export`/`bench` deploy (default: each stage's first)"
    )


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides to a nested dict (values parsed as YAML: ``1e-3``, ``true``, ``[1,2]``).

    A list (``stages``) is entered by index or by the ``name`` of an element:
    ``stages.teacher.steps=200`` or ``stages.0.steps=200``.
    """
    for item in overrides:
        if "=" not in item:
            raise MedistillError(f"override {item!r} is not of the form key.path=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node: Any = raw
        for depth, part in enumerate(parts[:-1]):
            where = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                node = _list_item(node, part, item, where)
                continue
            child = node.setdefault(part, {})
            if not isinstance(child, dict | list):
                raise MedistillError(f"override {item!r}: {where} is a value, not a section")
            node = child
        if isinstance(node, list):
            raise MedistillError(f"override {item!r}: {'.'.join(parts[:-1])} is a list; name an element")
        node[parts[-1]] = yaml.safe_load(value)
    return raw


def _list_item(items: list[Any], part: str, item: str, where: str) -> Any:
    """Element ``part`` (an index, or the value of an element's ``name``) of a list in a config."""
    if part.isdigit() and int(part) < len(items):
        return items[int(part)]
    named = [x for x in items if isinstance(x, dict) and x.get("name") == part]
    if not named:
        names = [str(x.get("name")) for x in items if isinstance(x, dict)]
        raise MedistillError(f"override {item!r}: {where}: no element {part!r} (have: {', '.join(names)})")
    return named[0]


def _submodel(ann: Any) -> tuple[type[BaseModel] | None, bool]:
    """The pydantic model inside an annotation (``X``, ``X | None``, ``list[X]``, ``dict[str, X]``), and
    whether a list index or dict key stands between the field and that model in an error location."""
    import typing

    origin = typing.get_origin(ann)
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann, False
    for arg in typing.get_args(ann):
        sub, keyed = _submodel(arg)
        if sub is not None:
            return sub, keyed or origin in (list, dict)
    return None, False


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the (sub)model reached by ``loc`` (for suggestions on unknown keys)."""
    parts = list(loc)
    while parts:
        field = model.model_fields.get(str(parts.pop(0)))
        if field is None:
            return []
        sub, keyed = _submodel(field.annotation)
        if sub is None:
            return []
        if keyed:
            if not parts:
                return []
            parts.pop(0)  # the list index or dict key
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
