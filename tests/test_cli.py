"""Every verb answers bad input with one clear line and a non-zero exit, writing nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from medistill.cli import main


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    return int(exc.value.code or 0), err


@pytest.fixture
def bad_files(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "bad.yaml").write_text("task: lung2d\ntrain:\n  steps: -3\n")
    (tmp_path / "typo.yaml").write_text("task: lung2d\ndata:\n  sise: 64\n")
    (tmp_path / "broken.yaml").write_text("task: [unclosed\n")
    return {p.name: p for p in tmp_path.iterdir()}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "{tmp}/missing.yaml"], "config file not found"),
        (["train", "{tmp}/bad.yaml"], "train.steps: Input should be greater than 0"),
        (["train", "{tmp}/typo.yaml"], "data.sise: unknown key (did you mean size?)"),
        (["train", "{tmp}/broken.yaml"], "not valid YAML"),
        (["train", "configs/demo.yaml", "--set", "train.lr=-1"], "train.lr: Input should be greater than 0"),
        (["train", "configs/demo.yaml", "--set", "nonsense"], "not of the form key.path=value"),
        (["evaluate", "{tmp}/no_run"], "not a medistill run folder"),
        (["export", "{tmp}"], "not a medistill run folder"),
        (["predict", "{tmp}", "{tmp}/missing.nii.gz", "--out", "{tmp}/o.nii.gz"], "input not found"),
        (["data", "fetch", "chest-cta"], "chest-ct"),
        (["data", "path", "nope"], "unknown"),
    ],
)
def test_bad_input_one_line(args, message, bad_files, tmp_path, capsys) -> None:
    before = sorted(p.name for p in tmp_path.iterdir())
    code, err = run_cli([a.replace("{tmp}", str(tmp_path)) for a in args], capsys)
    assert code != 0
    assert message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing half-written


def test_debug_flag_shows_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "medistill", "--debug", "train", str(tmp_path / "missing.yaml")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_help_lists_the_verbs() -> None:
    proc = subprocess.run([sys.executable, "-m", "medistill", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for verb in ("data", "simulate", "train", "predict", "evaluate", "export", "report", "run"):
        assert verb in proc.stdout


def _installed_cli() -> str:
    """The ``medistill`` console script installed beside this interpreter (what a user runs)."""
    script = Path(sys.executable).parent / "medistill"
    assert script.is_file(), f"no installed entry point at {script}: run `make setup`"
    return str(script)


@pytest.mark.parametrize(
    ("args", "usage", "problem"),
    [
        ([], "Usage: medistill [OPTIONS] COMMAND", "Commands"),
        (["--bogus"], "Usage: medistill [OPTIONS] COMMAND", "No such option: --bogus"),
        (["trian"], "Usage: medistill [OPTIONS] COMMAND", "No such command 'trian'"),
        (["train"], "Usage: medistill train [OPTIONS]", "Missing argument"),
        (
            ["predict", "runs/demo", "image.nii.gz"],
            "Usage: medistill predict [OPTIONS]",
            "Missing option '--out'",
        ),
        (["simulate", "drr"], "Usage: medistill simulate drr [OPTIONS]", "Missing argument"),
        (["data", "fetch"], "Usage: medistill data fetch [OPTIONS]", "Missing argument"),
        (
            ["train", "configs/demo.yaml", "--stpes", "3"],
            "Usage: medistill train [OPTIONS]",
            "No such option",
        ),
    ],
)
def test_installed_entry_point_usage_errors(args: list[str], usage: str, problem: str) -> None:
    """Usage errors of the real console script: usage line + problem on stderr, exit 2, no traceback."""
    proc = subprocess.run([_installed_cli(), *args], capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert usage in out and problem in out, out
    assert "Traceback" not in out and "ModuleNotFoundError" not in out, out


def test_installed_entry_point_user_error_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [_installed_cli(), "evaluate", str(tmp_path / "no_run")], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr


def test_unexpected_exception_is_one_line_exit_1(monkeypatch, capsys) -> None:
    """A bug (not the user's input) names the exception, hints at --debug, and exits 1."""
    import medistill.config

    def broken(*args, **kwargs):
        raise RuntimeError("the loader broke\nsecond line of detail")

    monkeypatch.setattr(medistill.config, "load_config", broken)
    code, err = run_cli(["train", "configs/demo.yaml"], capsys)
    assert code == 1
    assert (
        err.strip() == "error: unexpected RuntimeError: the loader broke (run with --debug for the traceback)"
    )
    with pytest.raises(RuntimeError, match="the loader broke"):
        main(["--debug", "train", "configs/demo.yaml"])


def test_success_returns_normally(capsys) -> None:
    """In-process callers (tests, notebooks) get a plain return on success, not SystemExit(0)."""
    assert main(["data", "list"]) is None
    assert "chest-ct" in capsys.readouterr().out
