"""Run folders: ``RUN/config.yaml`` + checkpoints + metrics + ``eval/`` + ``report.html``.

A run folder is self-describing: every verb after ``train`` (evaluate, predict, export, report)
rebuilds the task from ``RUN/config.yaml``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from medistill.config import ExperimentConfig, dump_config, validate_config
from medistill.errors import MedistillError
from medistill.io.atomic import atomic_write_text
from medistill.tasks.base import Task, make_task


def prepare_run(cfg: ExperimentConfig, run_dir: Path, overwrite: bool = False) -> Task:
    """Create ``run_dir`` with its config; refuse to mix two different experiments in one folder. The
    experiment is validated first, so a refused config leaves no folder behind."""
    text = dump_config(cfg)
    cfg_path = run_dir / "config.yaml"
    if cfg_path.exists() and not overwrite:
        old = yaml.safe_load(cfg_path.read_text())
        new = yaml.safe_load(text)
        for raw in (old, new):  # steps may change (the engine refuses a schedule restarted mid-way)
            raw.get("train", {}).pop("steps", None)
            for stage in raw.get("stages") or []:
                stage.pop("steps", None)
        if not _same_experiment(old, new):
            raise MedistillError(
                f"{run_dir} already holds a different experiment (config.yaml differs other than by "
                "stages appended at the end); choose another --out, or pass --overwrite to start afresh there"
            )
    task = make_task(cfg, run_dir)
    task.runner.validate()  # the whole experiment, before the folder is created or anything deleted
    if overwrite and run_dir.exists():
        for pattern in ("last.pt", "best.pt", "metrics.jsonl", "splits.json"):  # every stage's files
            for p in run_dir.rglob(pattern):
                p.unlink(missing_ok=True)  # under torchrun every rank deletes the same files at once
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cfg_path, text)
    return task


def _same_experiment(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether ``new`` is ``old`` or extends it by stages appended at the end (the trained stages, their
    order and every other setting unchanged). Which networks are exported and which one inference uses
    (``export``, ``infer``) may change: they do not change what was trained."""
    old_stages, new_stages = old.get("stages") or [], new.get("stages") or []
    if new_stages[: len(old_stages)] != old_stages:
        return False
    rest = ("stages", "export", "infer")
    return {k: v for k, v in old.items() if k not in rest} == {k: v for k, v in new.items() if k not in rest}


def open_run(run_dir: str | Path) -> Task:
    """The task of an existing run folder."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise MedistillError(f"{run_dir} is not a medistill run folder (no config.yaml); train one first")
    raw = yaml.safe_load(cfg_path.read_text())
    return make_task(validate_config(raw, str(cfg_path)), run_dir)


def write_json(path: Path, data: Any) -> Path:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")
    return path
