"""``medistill bench RUN``: parameters, FLOPs and CPU latency of a run's teacher and student, side by side.

Latency is measured here, on this machine, for one training-size patch and for a whole CT volume by
sliding window (the chest-ct example, or ``--volume FILE``), with PyTorch and onnxruntime at the same
thread count. Results go to ``RUN/bench/profile.json`` and are printed as a table.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from medistill.cli import app


@app.command()
def bench(
    run: Path = typer.Argument(..., help="run folder (a trained seg3d run)"),
    threads: int = typer.Option(2, help="intra-op threads for PyTorch and onnxruntime alike"),
    repeats: int = typer.Option(3, help="timed repeats per patch measurement (median reported)"),
    volume: Path | None = typer.Option(None, help="CT for the whole-volume timing (default: chest-ct)"),
    whole_volume: bool = typer.Option(True, help="also time a whole volume by sliding window"),
) -> None:
    """Profile the run's exportable networks (params, FLOPs, latency torch vs onnxruntime)."""
    import torch

    from medistill.deploy.profile import machine_info, profile_model, speedup_table
    from medistill.io.images import read_image
    from medistill.runs import open_run, write_json

    task = open_run(run)
    models = task.load_models("best")
    examples = task.example_inputs()
    patch = tuple(int(s) for s in next(iter(examples.values())).shape[2:])
    vol_tensor = None
    vol_name = None
    if whole_volume:
        from medistill.io.examples import example_file
        from medistill.tasks.segmentation3d import preprocess

        src = volume or example_file("chest-ct", "cxr.nii.gz")
        d = task.cfg.data
        vol = preprocess(read_image(src), d.spacing_mm, d.hu_window)
        vol_tensor = torch.from_numpy(vol.image)[None, None]
        vol_name = str(src)
    rows = [
        profile_model(
            name,
            models[name],
            patch,
            run / "bench" / f"{name}.onnx",
            threads,
            repeats,
            vol_tensor,
            task.cfg.data.sw_overlap,
        )
        for name in examples
    ]
    reference = "teacher" if "teacher" in examples else rows[0]["model"]
    result = {
        "machine": machine_info(),
        "volume": vol_name,
        "rows": rows,
        "ratios": speedup_table(rows, reference),
    }
    write_json(run / "bench" / "profile.json", result)
    table = Table(title=f"{run}: CPU cost, {threads} threads (reference {reference})")
    columns = [
        "model",
        "params",
        "gflops_patch",
        "patch_s_torch",
        "patch_s_onnx",
        "volume_s_torch",
        "volume_s_onnx",
    ]
    for c in columns:
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(*(f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in columns))
    Console().print(table)
    for r in result["ratios"]:
        typer.echo("  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
