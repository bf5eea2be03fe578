"""``medistill bench RUN``: parameters, MACs and CPU latency of a run's deployable networks, side by side.

Works on every task: each deployable network (``export:`` of the config, default each stage's first
model) is exported to ONNX and timed on one whole case as deployed (a whole image, a stack of slices, or
a whole volume by sliding window), with PyTorch and onnxruntime at the same thread count, after a
warm-up, min and median of ``--repeats`` (>= 5) runs. Ratios compare each network with the first one
(the teacher), best backend against best backend. The CPU model, thread count and load average are
printed and stored with the numbers in ``RUN/bench/profile.json``.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from medistill.cli import app
from medistill.errors import MedistillError


@app.command()
def bench(
    run: Path = typer.Argument(..., help="run folder (any task)"),
    threads: int = typer.Option(2, help="intra-op threads for PyTorch and onnxruntime alike"),
    repeats: int = typer.Option(5, help="timed repeats per backend (min and median reported; >= 5)"),
) -> None:
    """Profile the run's deployable networks (params, MACs, latency PyTorch vs onnxruntime)."""
    bench_run(run, threads, repeats)


def bench_run(run: Path, threads: int = 2, repeats: int = 5) -> dict:
    """:func:`bench` as a function; returns (and writes to RUN/bench/profile.json) the measurements."""
    from medistill.deploy.export import export_with_parity
    from medistill.deploy.profile import machine_info, profile_network, speedup_table
    from medistill.runs import open_run, write_json

    if repeats < 5:
        raise MedistillError(f"--repeats {repeats}: at least 5 timed repeats are needed for a median")
    task = open_run(run)
    rows, cases = [], {}
    for stage, model in task.runner.deployables():
        name = f"{stage}.{model}"
        net = task.stage_model(stage, model)
        inputs = task.deploy_inputs(stage, model)
        path = run / "bench" / f"{name}.onnx"
        export_with_parity(net, inputs, path, dynamic_spatial=task.dynamic_spatial(stage, model))
        case, whole = task.whole_input(stage, model)
        cases[name] = case
        rows.append(profile_network(name, net, path, inputs, whole, task.whole_inference, threads, repeats))
    reference = rows[0]["model"]
    machine = machine_info()
    result = {"machine": machine, "cases": cases, "rows": rows, "ratios": speedup_table(rows, reference)}
    write_json(run / "bench" / "profile.json", result)
    typer.echo(
        f"{machine['cpu']}, {machine['nproc']} CPUs, {threads} threads, load average "
        f"{machine['load_avg_1min']:.2f}; min / median of {repeats} runs after a warm-up"
    )
    table = Table(title=f"{run}: one whole case per network (reference {reference})")
    columns = [
        "model",
        "params",
        "gmacs_whole",
        "min_s_torch",
        "median_s_torch",
        "min_s_onnx",
        "median_s_onnx",
    ]
    for c in [*columns, "best_backend"]:
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(
            *(
                f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, ""))
                for c in [*columns, "best_backend"]
            )
        )
    Console().print(table)
    for name, case in cases.items():
        typer.echo(f"  {name}: {case}")
    for r in result["ratios"]:
        typer.echo("  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    return result
