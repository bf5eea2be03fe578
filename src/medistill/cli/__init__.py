"""The ``medistill`` command line.

Verbs live in sibling modules of this package; each module adds its commands to :data:`app` or to one
of the verb groups below when imported, and every module here is imported by :func:`main`. A usage
error prints the usage line and the problem, and a user error (:class:`~medistill.errors.MedistillError`,
a missing file, a bad value) one line, both with exit status 2; anything unexpected prints one line and
exits 1. ``medistill --debug ...`` shows the traceback instead.
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


def fail(message: str, code: int = 2) -> None:
    """Print one error line and exit with ``code`` (2: the user's input is wrong; 1: medistill failed)."""
    typer.echo(f"error: {message}", err=True)
    raise SystemExit(code)


#: Errors that mean "the input is wrong": one line, exit status 2.
USER_ERRORS = (MedistillError, FileNotFoundError, NotADirectoryError, IsADirectoryError, ValueError)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``medistill`` console script.

    Usage errors (no arguments, a missing argument or option, an unknown option or verb) are typer's
    own: the usage line and the problem on stderr, exit status 2. A user error raised by a verb prints
    one line and exits 2; anything unexpected prints one line naming it, with a hint to re-run with
    ``--debug`` (which shows the traceback instead), and exits 1.
    """
    _load_verbs()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        app(args=argv, prog_name="medistill", standalone_mode=True)
    except SystemExit as exc:  # standalone mode ends every call with one; success returns normally
        if exc.code not in (0, None):
            raise
    except USER_ERRORS as exc:
        if debug:
            raise
        fail(str(exc) or type(exc).__name__)
    except KeyboardInterrupt:
        fail("interrupted", code=130)
    except Exception as exc:  # anything unexpected: a bug in medistill or in a dependency
        if debug:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        fail(f"unexpected {type(exc).__name__}: {first} (run with --debug for the traceback)", code=1)
