"""``medistill simulate cohort``: a synthetic multi-organ CT cohort (see :mod:`medistill.tasks.cohort`)."""

from __future__ import annotations

from pathlib import Path

import typer

from medistill.cli import simulate_app
from medistill.errors import MedistillError


@simulate_app.command("cohort")
def simulate_cohort(
    out: Path = typer.Option(..., "--out", help="folder to write (MSD layout + splits.json)"),
    n: int = typer.Option(12, "--n", help="number of subjects (>= 3: train/val/test by subject)"),
    seed: int = typer.Option(0, help="cohort seed (same seed, same cohort)"),
    spacing: float = typer.Option(3.0, help="isotropic output spacing in mm"),
    min_voxels: int = typer.Option(1000, help="drop organs with fewer voxels than this in the crop"),
    overwrite: bool = typer.Option(False, help="replace an existing dataset in --out"),
) -> None:
    """Make N subjects from the chest-ct example (deformation, affine jitter, intensity, noise)."""
    from medistill.tasks.cohort import CohortSpec, make_cohort

    if (out / "dataset.json").exists() and not overwrite:
        raise MedistillError(f"{out} already holds a dataset.json; pass --overwrite to replace it")
    spec = CohortSpec(n_subjects=n, seed=seed, spacing_mm=(spacing,) * 3, min_voxels=min_voxels)
    dataset = make_cohort(out, spec)
    organs = ", ".join(f"{k}={v}" for k, v in dataset.labels.items() if v)
    typer.echo(f"{out / 'dataset.json'}  ({len(dataset.cases)} subjects; labels {organs})")
