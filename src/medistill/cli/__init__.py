"""The ``medistill`` command line.

Verbs live in sibling modules of this package; each module adds its commands to :data:`app` or to one
of the verb groups below when imported, and every module here is imported by :func:`main`. A user
error (:class:`~medistill.errors.MedistillError`, a missing file, a bad value) prints one line and
exits with status 2; ``medistill --debug ...`` shows the traceback instead.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import typer

from medistill.errors import MedistillError

app = typer.Typer(
    name="medistill",
    help="Simulate data from CT, train teachers, distill light students and deploy them on CPU.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Example data: list, fetch, path, check.", no_args_is_help=True)
simulate_app = typer.Typer(
    help="Simulate training data from CT (DRRs, metal artifacts, synthetic cohorts).", no_args_is_help=True
)
report_app = typer.Typer(help="Figures and HTML reports.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(simulate_app, name="simulate")
app.add_typer(report_app, name="report")

_state = {"debug": False}


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    _state["debug"] = debug


def _load_verbs() -> None:
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def fail(message: str) -> None:
    """Print one error line and exit with status 2."""
    typer.echo(f"error: {message}", err=True)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``medistill`` console script."""
    _load_verbs()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        app(args=argv, standalone_mode=False)
    except (MedistillError, FileNotFoundError, NotADirectoryError, IsADirectoryError, ValueError) as exc:
        if debug:
            raise
        fail(str(exc) or type(exc).__name__)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        fail("interrupted")
    except Exception as exc:  # click usage errors and anything unexpected
        import click

        if isinstance(exc, click.exceptions.Abort):
            fail("aborted")
        if isinstance(exc, click.ClickException):
            if debug:
                raise
            fail(exc.format_message())
        if debug:
            raise
        fail(f"{type(exc).__name__}: {exc} (run with --debug for the traceback)")
