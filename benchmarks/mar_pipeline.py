"""MAR whole-slice pipeline time: what ``medistill predict RUN CT`` spends per metal slice, by stage.

    python benchmarks/mar_pipeline.py RUN [--sizes 416 512] [--threads 2] [--repeats 5] [--json out.json]

One real head CT slice (the ``radiographs`` set's 693_UNCR.dcm, 512^2 at 0.48 mm) with a titanium
implant painted in at 3500 HU (a 6 mm disc in the bone near the front of the skull, what a real metal CT
shows), resampled to each size, goes through ``MARTask.correct_slices`` exactly as ``predict`` runs it:
metal threshold, resampling to ``data.size``, the LI image re-projected from the slice, the network
(PyTorch), the correction added at the input resolution. Per network: warm-up, then min and median of
``--repeats`` timed runs, with the CPU model, threads and load average. Read-only on RUN.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from medistill.deploy.profile import machine_info
from medistill.io.checks import read_ct
from medistill.io.examples import example_file
from medistill.runs import open_run
from medistill.tasks import mar_data


def metal_slice(size: int) -> tuple[np.ndarray, float]:
    """The 693 head slice at ``size^2`` (HU) with a 6 mm titanium disc at 3500 HU, and its pixel (mm)."""
    image = read_ct(example_file("radiographs", "693_UNCR.dcm"))
    hu = np.clip(np.asarray(image.array, np.float32), -1024.0, 3071.0)
    pixel_mm = float(image.spacing[-1]) * hu.shape[-1] / size
    hu = mar_data.resample(hu[None], size)[0]
    bone = np.argwhere(hu > 700)
    r, c = bone[np.argmin(bone[:, 0])] + [int(round(4 / pixel_mm)), 0]  # 4 mm inside the frontal bone
    y, x = np.ogrid[:size, :size]
    hu[(y - r) ** 2 + (x - c) ** 2 <= (3.0 / pixel_mm) ** 2] = 3500.0
    return hu, pixel_mm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--sizes", type=int, nargs="+", default=[416, 512])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.repeats < 5:
        parser.error("--repeats: at least 5")
    torch.set_num_threads(args.threads)
    task = open_run(args.run)
    rows = []
    for stage, model in task.runner.deployables():
        net = task.stage_model(stage, model).eval()
        for size in args.sizes:
            hu, pixel_mm = metal_slice(size)
            _, n = task.correct_slices(net, hu[None], pixel_mm)  # warm-up
            if n != 1:
                raise SystemExit(f"the painted implant was not detected as metal at {size}^2")
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                task.correct_slices(net, hu[None], pixel_mm)
                times.append(time.perf_counter() - t0)
            rows.append(
                {
                    "network": f"{stage}.{model}",
                    "slice": size,
                    "min_s": min(times),
                    "median_s": float(np.median(times)),
                }
            )
            print(f"{stage}.{model} {size}^2: min {min(times):.3f} s, median {np.median(times):.3f} s")
    machine = machine_info() | {"threads": args.threads}
    print(f"{machine['cpu']}, {args.threads} threads, load average {machine['load_avg_1min']:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
