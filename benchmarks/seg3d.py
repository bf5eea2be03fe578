"""System C cost benchmark: nnU-Net-size teacher vs LCOV-Net at the paper's widths, on CPU.

Latency does not depend on the weights, so the networks are built untrained at the published sizes:
the 3D full-resolution nnU-Net architecture (MONAI DynUNet, 6 levels, widths 32..320, ~31 M parameters)
and LCOV-Net with the released widths [32, 64, 128, 256, 256] (2.79 M). Both are exported to ONNX and
timed with PyTorch and onnxruntime at the same thread count on a 96^3 patch and on the whole chest-ct
volume (resampled to ``--spacing`` mm) by Gaussian-weighted sliding window with 96^3 windows.

    .venv/bin/python benchmarks/seg3d.py --threads 2 --json benchmarks/seg3d_results.json

Numbers are recorded in benchmarks/RESULTS_seg3d.md. ``medistill bench RUN`` measures a trained run's
own (smaller) networks the same way.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from medistill.deploy.profile import machine_info, profile_model, speedup_table
from medistill.io.examples import example_file
from medistill.io.images import read_image
from medistill.nets import DynUNetTeacher, LCOVNet
from medistill.tasks.segmentation3d import Normalisation, preprocess


def markdown(rows: list[dict], ratios: list[dict]) -> str:
    head = (
        "| model | params | GMACs / patch | volume torch s (min / median) | volume ORT s (min / median) |\n"
        "|---|---:|---:|---:|---:|\n"
    )
    body = "".join(
        f"| {r['model']} | {r['params'] / 1e6:.2f} M | {r['gmacs_input']:.1f} | "
        f"{r['min_s_torch']:.1f} / {r['median_s_torch']:.1f} | "
        f"{r['min_s_onnx']:.1f} / {r['median_s_onnx']:.1f} |\n"
        for r in rows
    )
    ratio = "".join(
        f"- {q['model']}: " + ", ".join(f"{k} {v:.2f}x" for k, v in q.items() if k != "model") + "\n"
        for q in ratios
    )
    return (
        head
        + body
        + "\nRatios against the teacher (params, MACs, speed-up best backend vs best backend):\n"
        + ratio
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--patch", type=int, default=96)
    parser.add_argument("--spacing", type=float, default=3.0, help="whole-volume spacing in mm")
    parser.add_argument("--no-volume", action="store_true", help="patch timings only")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    nets = {
        "teacher (nnU-Net 3D, DynUNet)": DynUNetTeacher(3, 1, 17),
        "student (LCOV-Net, released widths)": LCOVNet(3, 1, 17, features=(32, 64, 128, 256, 256)),
    }
    volume = None
    if not args.no_volume:
        norm = Normalisation("volume_zscore", (-160.0, 240.0))  # timing only: any normalisation will do
        vol = preprocess(read_image(example_file("chest-ct", "cxr.nii.gz")), (args.spacing,) * 3, norm)
        volume = torch.from_numpy(vol.image)[None, None]
    patch = (args.patch,) * 3
    with tempfile.TemporaryDirectory() as tmp:
        rows = [
            profile_model(name, net, patch, Path(tmp) / f"{i}.onnx", args.threads, args.repeats, volume)
            for i, (name, net) in enumerate(nets.items())
        ]
    ratios = speedup_table(rows, rows[0]["model"])
    result = {"machine": machine_info(), "spacing_mm": args.spacing, "rows": rows, "ratios": ratios}
    print(json.dumps(result["machine"]))
    print(markdown(rows, ratios))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
