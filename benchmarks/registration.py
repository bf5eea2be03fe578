"""CPU speed of the registration networks per pair, PyTorch and onnxruntime side by side, with SimpleITK's
B-spline registration on the same pair (the classical baseline of `medistill evaluate`), and optionally the
instance optimisation that follows the network when ``refine.steps`` is set (``--refine-steps``).

    python benchmarks/registration.py --size 128 --threads 2 --out benchmarks/results/registration.json

Networks are timed with random weights (latency does not depend on them), batch 1, after 2 warm-up
runs, min and median of ``--repeats`` runs; the ONNX export holds the warp(s) (opset 20). The machine
load (``os.getloadavg``) is recorded next to the times: on a shared machine they are upper bounds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from medistill.deploy.export import export_onnx, onnx_session
from medistill.nets.registration import ldr, vtn_cascade, warp
from medistill.tasks.registration import sitk_bspline
from medistill.tasks.registration_data import smooth_field


def timed(fn, repeats: int) -> dict[str, float]:
    for _ in range(2):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return {"min_s": min(ts), "median_s": statistics.median(ts), "runs": repeats}


def timed_refine(
    fixed: torch.Tensor, moving: torch.Tensor, steps: int, repeats: int, size: int | None
) -> dict[str, float]:
    """``refine_displacement`` from a zero field (its cost does not depend on the start) with the quick
    preset's loss (Pearson + gradient smoothness, weights 1) and the default ``refine`` lr and grid."""
    from medistill.losses.regularization import GradientSmoothness
    from medistill.losses.similarity import PearsonLoss
    from medistill.tasks.registration_refine import RegRefine, refine_displacement

    sim, smooth = PearsonLoss(), GradientSmoothness()
    cfg = RegRefine(steps=steps, size=size)
    zero = torch.zeros(1, 3, *fixed.shape[2:])
    return timed(
        lambda: refine_displacement(fixed, moving, zero, lambda f, w, u: sim(f, w) + smooth(u), cfg), repeats
    ) | {"steps": steps, "grid": cfg.grid, "size": size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--nets", default="ldr_paper,ldr_compact,vtn_teacher")
    ap.add_argument("--sitk-iterations", type=int, default=30)
    ap.add_argument(
        "--refine-steps",
        type=int,
        default=0,
        help="also time instance optimisation (refine) of this many steps",
    )
    ap.add_argument("--refine-size", type=int, default=None, help="refine.size (optimisation grid)")
    ap.add_argument("--no-sitk", action="store_true", help="skip SimpleITK (97 s per 128^3 pair)")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    s = a.size
    rng = np.random.default_rng(0)
    fixed = torch.rand(1, 1, s, s, s)
    moving = warp(fixed, smooth_field((s, s, s), rng, 0.05 * s)[None])
    nets = {
        "ldr_paper": lambda: ldr(),
        "ldr_compact": lambda: ldr(variant="compact"),
        "vtn_teacher": lambda: vtn_cascade(cascades=3, levels=min(6, int(np.log2(s)) - 1)),
    }
    rows: dict[str, dict] = {}
    for name in a.nets.split(","):
        net = nets[name]().eval()
        row: dict = {"params": sum(p.numel() for p in net.parameters())}
        with torch.no_grad():
            row["torch"] = timed(lambda net=net: net.with_warp()(fixed, moving), a.repeats)
        with tempfile.TemporaryDirectory() as tmp:
            path = export_onnx(
                net.with_warp(), {"fixed": fixed, "moving": moving}, Path(tmp) / "n.onnx", opset=20
            )
            sess = onnx_session(path, threads=a.threads)
            feed = {"fixed": fixed.numpy(), "moving": moving.numpy()}
            row["onnxruntime"] = timed(lambda sess=sess, feed=feed: sess.run(None, feed), a.repeats)
        rows[name] = row
        print(name, json.dumps(row), flush=True)
    if a.refine_steps:
        rows[f"refine_{a.refine_steps}"] = {
            "torch": timed_refine(fixed, moving, a.refine_steps, a.repeats, a.refine_size)
        }
        print(f"refine_{a.refine_steps}", json.dumps(rows[f"refine_{a.refine_steps}"]), flush=True)
    if not a.no_sitk:
        rows["sitk_bspline"] = {
            "sitk": timed(
                lambda: sitk_bspline(fixed, moving, a.sitk_iterations, a.threads), max(1, a.repeats // 2)
            )
        }
        print("sitk_bspline", json.dumps(rows["sitk_bspline"]), flush=True)
    result = {
        "size": s,
        "threads": a.threads,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "load_average": os.getloadavg(),
        "per": "one pair, batch 1, network + warp",
        "results": rows,
    }
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
