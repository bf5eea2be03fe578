"""``medistill simulate cohort``: a synthetic multi-organ CT cohort (see :mod:`medistill.tasks.cohort`)."""

from __future__ import annotations

import math
from pathlib import Path

import typer

from medistill.cli import simulate_app
from medistill.errors import MedistillError


@simulate_app.command("cohort")
def simulate_cohort(
    out: Path = typer.Option(..., "--out", help="folder to write (MSD layout + splits.json)"),
    n: int = typer.Option(12, "--n", help="number of subjects (>= 3: train/val/test by subject)"),
    seed: int = typer.Option(0, help="cohort seed (same seed, same cohort)"),
    spacing: float = typer.Option(3.0, help="isotropic output spacing in mm (> 0)"),
    min_volume_ml: float = typer.Option(
        27.0, help="leave out organs smaller than this (ml); label ids stay fixed (WORD order)"
    ),
    overwrite: bool = typer.Option(False, help="replace an existing dataset in --out"),
) -> None:
    """Make N subjects from the chest-ct example (deformation, affine jitter, intensity, noise)."""
    from medistill.io.checks import check_output_folder
    from medistill.tasks.cohort import CohortSpec, make_cohort

    if not (math.isfinite(spacing) and spacing > 0):
        raise MedistillError(f"--spacing must be a positive length in mm, got {spacing:g}")
    if not min_volume_ml >= 0:
        raise MedistillError(f"--min-volume-ml must be >= 0 ml, got {min_volume_ml:g}")
    check_output_folder(out)
    if (out / "dataset.json").exists() and not overwrite:
        raise MedistillError(f"{out} already holds a dataset.json; pass --overwrite to replace it")
    spec = CohortSpec(n_subjects=n, seed=seed, spacing_mm=(spacing,) * 3, min_volume_ml=min_volume_ml)
    dataset = make_cohort(out, spec)
    organs = ", ".join(f"{k}={v}" for k, v in dataset.labels.items() if v)
    typer.echo(f"{out / 'dataset.json'}  ({len(dataset.cases)} subjects; labels {organs})")
