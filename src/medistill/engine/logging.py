"""Run logging: a JSONL metrics file, TensorBoard scalars and a progress bar (rank 0 only)."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class RunLogger:
    """Writes ``metrics.jsonl`` (one JSON object per line) and TensorBoard events under ``run_dir``."""

    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self._tb = None
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, step: int, values: dict[str, float], phase: str = "train") -> None:
        if not self.enabled:
            return
        record: dict[str, Any] = {"step": step, "phase": phase, "time": round(time.time(), 3)}
        record.update({k: (float(v) if math.isfinite(float(v)) else None) for k, v in values.items()})
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(f"{phase}/{k}", float(v), step)

    def truncate_after(self, step: int) -> None:
        """On resume, drop records written after the checkpoint's step (they will be redone)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        self.path.write_text("".join(ln + "\n" for ln in kept))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: Path, phase: str | None = None) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` file, optionally of one phase."""
    if not path.exists():
        return []
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    return [r for r in rows if phase is None or r.get("phase") == phase]


def make_progress(enabled: bool) -> Progress:
    """A rich progress bar; silent when disabled (non-zero ranks, ``train.progress: false``)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=not sys.stderr.isatty(),
    )
