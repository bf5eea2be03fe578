"""Verbs on experiments: train, evaluate, predict, run (all stages), report run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from medistill.cli import app, report_app
from medistill.errors import MedistillError

console = Console(stderr=True)

# the options shared by `train` and `run`
ConfigArg = Annotated[Path, typer.Argument(help="experiment YAML")]
OutOpt = Annotated[Path | None, typer.Option("--out", help="run folder (default runs/<name>)")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="override a config value: a.b=c (repeatable)")
]
OverwriteOpt = Annotated[bool, typer.Option(help="start afresh in an existing run folder")]
StageOpt = Annotated[
    str | None, typer.Option("--stage", help="run only this stage (its inputs must be trained)")
]


def _train(
    config: Path, out: Path | None, overrides: list[str], overwrite: bool, stage: str | None = None
) -> Path:
    from medistill.config import load_config
    from medistill.runs import prepare_run

    cfg = load_config(config, overrides)
    run_dir = out or Path("runs") / cfg.name
    task = prepare_run(cfg, run_dir, overwrite=overwrite)
    task.runner.run(only=stage)
    return run_dir


def _print_cases(result: dict) -> None:
    cases = result.get("cases", {})
    if not cases:
        return
    metrics = sorted({k for v in cases.values() for k in v})
    table = Table(title=result.get("note", "evaluation"))
    table.add_column("case")
    for m in metrics:
        table.add_column(m, justify="right")
    for case, vals in cases.items():
        table.add_row(
            case,
            *(f"{vals[m]:.4f}" if isinstance(vals.get(m), float) else str(vals.get(m, "")) for m in metrics),
        )
    Console().print(table)


def _evaluate(run_dir: Path) -> dict:
    from medistill.runs import open_run, write_json

    task = open_run(run_dir)
    out_dir = run_dir / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    result = task.evaluate(out_dir)
    write_json(out_dir / "metrics.json", result)
    _print_cases(result)
    return result


@app.command()
def train(
    config: ConfigArg,
    out: OutOpt = None,
    set_: SetOpt = None,
    overwrite: OverwriteOpt = False,
    stage: StageOpt = None,
) -> None:
    """Train the stages of CONFIG in order, skipping finished ones and resuming RUN/<stage>/last.pt."""
    run_dir = _train(config, out, set_ or [], overwrite, stage)
    typer.echo(str(run_dir))


@app.command()
def evaluate(run: Path = typer.Argument(..., help="run folder")) -> None:
    """Evaluate a trained run on its test data; writes RUN/eval/metrics.json and figures."""
    _evaluate(run)


@app.command()
def predict(
    run: Path = typer.Argument(..., help="run folder"),
    input: Path | None = typer.Argument(
        None, help="image to process (NIfTI, MHA, NRRD, DICOM), or a folder of radiographs (xray_bones)"
    ),
    out: Path = typer.Option(..., "--out", help="output file (e.g. pred.nii.gz), or folder for a pair"),
    fixed: Path | None = typer.Option(None, "--fixed", help="registration: the fixed image (output grid)"),
    moving: Path | None = typer.Option(None, "--moving", help="registration: the moving image"),
    moving_labels: Path | None = typer.Option(None, "--moving-labels", help="registration: labels to warp"),
    prealign: str = typer.Option(
        "none", "--prealign", help="registration: classical pre-alignment first (none, rigid, affine)"
    ),
    refine_steps: int | None = typer.Option(
        None,
        "--refine-steps",
        help="registration: instance-optimisation steps after the network (default: "
        "the run's refine.steps; 0: the network alone)",
    ),
) -> None:
    """Run the trained model on INPUT (or register --moving to --fixed) and write the result in the input's
    (the fixed image's) geometry. For a task that writes a folder per input (xray_bones), INPUT may be a
    folder: every radiograph in it goes to OUT/<stem>/, with OUT/summary.json."""
    pair = fixed is not None or moving is not None
    if pair and (fixed is None or moving is None or input is not None):
        raise MedistillError("registration needs both --fixed and --moving (and no INPUT)")
    if (refine_steps is not None or prealign != "none") and not pair:
        raise MedistillError(
            "--refine-steps and --prealign are for registration pairs (--fixed and --moving)"
        )
    inputs = [p for p in (fixed, moving, moving_labels) if p is not None] if pair else [input]
    if inputs == [None]:
        raise MedistillError("give INPUT, or --fixed and --moving for a registration run")
    for path in inputs:
        if not path.exists():
            raise MedistillError(f"input not found: {path}")
    from medistill.io.checks import IMAGE_SUFFIXES, check_output_folder, check_output_path
    from medistill.runs import open_run

    task = open_run(run)  # the run's config only: the output is checked before any weights are loaded
    writes = getattr(task, "predict_writes", IMAGE_SUFFIXES)  # file endings, or "folder"
    if writes == "folder":
        check_output_folder(out, inputs=inputs)
    else:
        check_output_path(out, writes, inputs=inputs)
    if writes == "folder" and not pair and input.is_dir() and hasattr(task, "predict_folder"):
        task.predict_folder(input, out)  # checks the folder and OUT, then loads the model once
    elif pair:
        if not hasattr(task, "predict_pair"):
            raise MedistillError(f"task {task.cfg.task!r} does not register pairs; give one INPUT")
        task.predict_pair(fixed, moving, out, moving_labels, refine_steps, prealign)
    else:
        task.predict_file(input, out)
    typer.echo(str(out))


def _report(run_dir: Path) -> Path:
    import json

    from medistill.report.figures import plot_training_curves
    from medistill.report.html import Section, write_report
    from medistill.runs import open_run

    task = open_run(run_dir)
    eval_path = run_dir / "eval" / "metrics.json"
    result = json.loads(eval_path.read_text()) if eval_path.exists() else {}
    stages = {
        p.parent.name if p.parent != run_dir else "model": p.parent for p in run_dir.rglob("metrics.jsonl")
    }
    curves = plot_training_curves(stages, run_dir / "eval" / "curves.png", val_metric=task.val_metric)
    extra = [  # the evaluation's own tables ({title, note, header, rows}) come first when it has them
        Section(t["title"], t.get("note", ""), tables=[(t["header"], t["rows"])])
        for t in result.get("tables", [])
    ]
    every = []
    cases = result.get("cases", {})
    if cases:
        metrics = sorted({k for v in cases.values() for k in v})
        rows = [[c, *(v.get(m, "") for m in metrics)] for c, v in cases.items()]
        title = "Every case and metric" if extra else "Test metrics"
        every.append(Section(title, result.get("note", ""), tables=[(["case", *metrics], rows)]))
    sections = extra + ([] if extra else every)
    sections.append(Section("Figures", figures=[Path(f) for f in result.get("figures", [])]))
    sections.extend(_deployment_sections(run_dir))
    if extra:
        sections.extend(every)
    sections.append(Section("Training", figures=[curves]))
    sections.append(Section("Configuration", (run_dir / "config.yaml").read_text(), pre=True))
    return write_report(run_dir / "report.html", f"medistill run: {run_dir.name} ({task.cfg.task})", sections)


def _deployment_sections(run_dir: Path) -> list:
    """Report sections from ``medistill export`` (ONNX parity) and ``medistill bench`` (CPU latency)."""
    import json

    from medistill.report.html import Section

    sections = []
    parity = run_dir / "export" / "parity.json"
    if parity.exists():
        rows = [[k, v["max_abs_diff"], str(v["inputs"])] for k, v in json.loads(parity.read_text()).items()]
        text = "Each network exported to ONNX and run on a real input of the run by onnxruntime and PyTorch."
        sections.append(
            Section("ONNX export", text, tables=[(["network", "max |onnx - torch|", "inputs"], rows)])
        )
    bench = run_dir / "bench" / "profile.json"
    if bench.exists():
        b = json.loads(bench.read_text())
        m, first = b["machine"], b["rows"][0]
        text = (
            f"{m['cpu']}, {m['nproc']} CPUs, {first['threads']} threads for both backends, load average "
            f"{m['load_avg_1min']:.2f} when measured; min and median of {first['repeats']} runs after a "
            "warm-up. " + " ".join(f"{k}: {v}." for k, v in b["cases"].items())
        )
        ratios = {r["model"]: r for r in b["ratios"]}
        header = ["network", "params", "GMACs", "PyTorch min s", "PyTorch median s", "ORT min s",
                  "ORT median s", "MACs ratio", "speed-up (best vs best)"]  # fmt: skip
        rows = [
            [r["model"], r["params"], r["gmacs_whole"], r["min_s_torch"], r["median_s_torch"],
             r["min_s_onnx"], r["median_s_onnx"], ratios[r["model"]]["macs_ratio"],
             ratios[r["model"]]["speedup_best"]]
            for r in b["rows"]
        ]  # fmt: skip
        sections.append(Section("CPU latency", text, tables=[(header, rows)]))
    return sections


@report_app.command("run")
def report_run(run: Path = typer.Argument(..., help="run folder")) -> None:
    """Write RUN/report.html (metrics, figures, training curves, config)."""
    typer.echo(str(_report(run)))


@app.command("run")
def run_all(
    config: ConfigArg,
    out: OutOpt = None,
    set_: SetOpt = None,
    overwrite: OverwriteOpt = False,
    export_: Annotated[
        bool, typer.Option("--export", help="also export the deployable networks to ONNX (parity checked)")
    ] = False,
    bench_: Annotated[
        bool, typer.Option("--bench", help="also measure their CPU latency (PyTorch and onnxruntime)")
    ] = False,
) -> None:
    """Train every stage (skipping finished ones), evaluate and report: the whole pipeline of CONFIG.
    With ``--export`` / ``--bench`` the report also holds the ONNX parity and the CPU latency tables."""
    run_dir = _train(config, out, set_ or [], overwrite)
    if export_:
        export_run(run_dir)
    _evaluate(run_dir)
    if bench_:
        from medistill.cli.bench import bench_run

        bench_run(run_dir)
    typer.echo(str(_report(run_dir)))


@app.command()
def export(
    run: Path = typer.Argument(..., help="run folder"),
    tolerance: float = typer.Option(1e-3, help="max allowed |onnx - torch| on a real input of the run"),
) -> None:
    """Export the run's deployable networks to RUN/export/<stage>.<model>.onnx with a parity check on
    real inputs from the run's data (named inputs, dynamic spatial axes where the network allows); the
    preprocessing contract goes into each model's metadata and RUN/export/<stage>.<model>.json."""
    export_run(run, tolerance)


def export_run(run: Path, tolerance: float = 1e-3) -> dict:
    """:func:`export` as a function; returns (and writes to RUN/export/parity.json) the parity report."""
    from medistill.deploy.export import contract_metadata, export_with_parity
    from medistill.runs import open_run, write_json

    task = open_run(run)
    report = {}
    for stage, model in task.runner.deployables():
        net = task.stage_model(stage, model)
        inputs = task.deploy_inputs(stage, model)
        path = run / "export" / f"{stage}.{model}.onnx"
        dynamic = task.dynamic_spatial(stage, model)
        contract = task.deploy_contract(stage, model) | {
            "inputs": list(inputs),
            "dynamic_spatial": dynamic,
            "trained_size": {k: list(v.shape[2:]) for k, v in inputs.items()},
        }
        diff = export_with_parity(
            net,
            inputs,
            path,
            tolerance=tolerance,
            dynamic_spatial=dynamic,
            metadata=contract_metadata(contract),
        )
        write_json(path.with_suffix(".json"), contract)
        report[f"{stage}.{model}"] = {
            "onnx": str(path),
            "contract": str(path.with_suffix(".json")),
            "max_abs_diff": diff,
            "inputs": {k: list(v.shape) for k, v in inputs.items()},
        }
        typer.echo(f"{path}  max |onnx - torch| = {diff:.2e}")
    write_json(run / "export" / "parity.json", report)
    return report
