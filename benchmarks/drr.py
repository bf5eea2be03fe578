"""DRR speed and accuracy: medistill vs nanodrr (torch backend) and DiffDRR, same CT, geometry and threads.

Run in the benchmark venv (peers installed from benchmarks/requirements-drr.txt):

    .venv-bench/bin/python benchmarks/drr.py --threads 2

Every (renderer, case) runs in its own subprocess so that its peak resident memory is its own. Accuracy is
the mean relative error of line integrals against the exact Siddon reference
(:mod:`medistill.physics.drr_reference`) at random pixels whose rays cross the body (reference > 1 mu x mm),
each renderer on the rays it actually cast: medistill and nanodrr get the identical camera (same 3x4 P);
DiffDRR builds its own (AP, source 850 mm from the centre), so its rays come from its ``detector``.
Prints a markdown table; numbers are wall-clock ms per DRR (min / median / max) after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

CASES = [(200, 2.0, False), (200, 2.0, True), (512, 0.78, False), (512, 0.78, True)]
SDD_MM, SID_MM = 1020.0, 850.0


def _load(cache: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mu (I J K) float32, labels (I J K) int64, affine (4 4)) of chest-ct, decoded once into ``cache``."""
    if not (cache / "mu.npy").exists():
        from medistill.io import examples
        from medistill.io.images import read_image
        from medistill.physics.attenuation import hu_to_mu

        folder = examples.example_path("chest-ct")
        ct, labels = read_image(folder / "cxr.nii.gz"), read_image(folder / "mask.nii.gz")
        mu = hu_to_mu(torch.from_numpy(np.asarray(ct.array, dtype=np.float32))).numpy()
        np.save(cache / "mu.npy", mu)
        np.save(cache / "labels.npy", np.asarray(labels.array).astype(np.int64))
        np.save(cache / "affine.npy", ct.affine)
    return (
        np.load(cache / "mu.npy", mmap_mode="r"),
        np.load(cache / "labels.npy", mmap_mode="r"),
        np.load(cache / "affine.npy"),
    )


def _camera(height: int, spacing: float, affine: np.ndarray):
    from medistill.physics.geometry import Detector, view_pose, volume_centre_mm

    centre = volume_centre_mm((512, 512, 133), torch.tensor(affine))
    return Detector(height, height, (spacing, spacing), SDD_MM), view_pose("ap", centre, SID_MM)


def _siddon_error(
    mu: np.ndarray, affine: np.ndarray, source: np.ndarray, targets: np.ndarray, got: np.ndarray
) -> float:
    from medistill.physics.drr_reference import siddon_line_integrals

    ref = siddon_line_integrals(mu, affine, source, targets)
    keep = ref > 1.0
    return float(np.mean(np.abs(got[keep] - ref[keep]) / ref[keep]))


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _time(fn, repeats: int) -> tuple[list[float], list[float]]:
    """Wall-clock and process CPU seconds (all threads) of each call after one warm-up. CPU time is
    reported too because a shared machine's load inflates wall time far more than CPU time."""
    fn()
    walls, cpus = [], []
    for _ in range(repeats):
        start, cpu = time.perf_counter(), _cpu_s()
        fn()
        walls.append(time.perf_counter() - start)
        cpus.append(_cpu_s() - cpu)
    return walls, cpus


def _pixels(height: int, n: int) -> np.ndarray:
    return np.random.default_rng(0).choice(height * height, min(n, height * height), replace=False)


def run_one(
    renderer: str, height: int, spacing: float, labels: bool, repeats: int, n_pixels: int, cache: Path
) -> dict:
    mu_np, lab_np, affine = _load(cache)
    mu = torch.from_numpy(np.ascontiguousarray(mu_np))
    lab = torch.from_numpy(np.ascontiguousarray(lab_np))
    detector, pose = _camera(height, spacing, affine)
    pix = _pixels(height, n_pixels)
    result: dict = {}
    with torch.no_grad():
        if renderer.startswith("medistill"):
            from medistill.physics.drr import DRRRenderer
            from medistill.physics.geometry import pixel_directions

            method = renderer.split(":")[1]
            drr = DRRRenderer(mu, torch.tensor(affine), lab if labels else None, method=method)
            times, cpus = _time(lambda: drr.render(detector, pose), repeats)
            image = drr.render(detector, pose, labels=False).line_integral[0].reshape(-1).numpy()
            source = pose.source_mm[0].numpy()
            targets = source + pixel_directions(detector, pose)[0].reshape(-1, 3).numpy()[pix]
            result["channels"] = len(drr.label_ids) if labels else 0
        elif renderer == "nanodrr":
            from nanodrr.data import Subject
            from nanodrr.drr import render
            from torchio import LabelMap, ScalarImage

            from medistill.physics.geometry import pixel_directions

            subject = Subject.from_images(
                ScalarImage(tensor=mu[None], affine=affine),
                LabelMap(tensor=lab[None], affine=affine) if labels else None,
                convert_to_mu=False,
            )
            k = detector.intrinsics()
            k[0, 2] += 0.5  # nanodrr puts pixel centres at (col + 0.5, row + 0.5)
            k[1, 2] += 0.5
            rt_inv = torch.eye(4, dtype=torch.float64)
            rt_inv[:3, :3] = pose.rotation[0].T
            rt_inv[:3, 3] = pose.source_mm[0]
            args = (
                subject,
                torch.linalg.inv(k)[None].float(),
                rt_inv[None].float(),
                torch.tensor([SDD_MM]),
                height,
                height,
            )
            times, cpus = _time(lambda: render(*args, backend="torch"), repeats)
            out = render(*args, backend="torch")
            result["channels"] = int(out.shape[1]) if labels else 0
            image = out[0].sum(0).reshape(-1).numpy()
            source = pose.source_mm[0].numpy()
            targets = source + pixel_directions(detector, pose)[0].reshape(-1, 3).numpy()[pix]
        else:  # diffdrr:siddon or diffdrr:trilinear
            from diffdrr.data import read
            from diffdrr.drr import DRR
            from torchio import LabelMap, ScalarImage

            subject = read(
                ScalarImage(tensor=mu[None], affine=affine),
                LabelMap(tensor=lab[None], affine=affine) if labels else None,
                orientation="AP",
            )
            drr = DRR(subject, sdd=SDD_MM, height=height, delx=spacing, renderer=renderer.split(":")[1])
            rot = torch.zeros(1, 3)
            xyz = torch.tensor([[0.0, SID_MM, 0.0]])
            kwargs = {"parameterization": "euler_angles", "convention": "ZXY", "mask_to_channels": labels}
            last: dict = {}
            times, cpus = _time(lambda: last.update(out=drr(rot, xyz, **kwargs)), repeats)
            out = last["out"]  # with labels: one channel per structure; error is only computed without
            from diffdrr.pose import convert

            source_t, target_t = drr.detector(
                convert(rot, xyz, parameterization="euler_angles", convention="ZXY"), None
            )
            image = out[0, 0].reshape(-1).numpy()
            mu_np = drr.density.numpy().astype(np.float64)
            affine = drr._affine[0].double().numpy()
            source = source_t[0, 0].double().numpy()
            targets = target_t[0].double().numpy()[pix]
            result["channels"] = int(last["out"].shape[1]) if labels else 0
    result.update(
        times_ms=[t * 1000 for t in times],
        cpu_ms=[t * 1000 for t in cpus],
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )
    if not labels:
        got = image[pix]
        if renderer.startswith("diffdrr"):
            # DiffDRR integrates its own density (not mu); compare shapes of the integrals after one
            # global least-squares unit scale, and report the scale
            from medistill.physics.drr_reference import siddon_line_integrals

            ref = siddon_line_integrals(mu_np, affine, source, targets)
            keep = ref > np.quantile(ref, 0.05) if ref.max() > 0 else ref > 0
            scale = float((got[keep] @ ref[keep]) / (got[keep] @ got[keep]))
            result["unit_scale"] = scale
            result["rel_error"] = float(np.mean(np.abs(scale * got[keep] - ref[keep]) / ref[keep]))
        else:
            result["rel_error"] = _siddon_error(
                np.asarray(mu_np, dtype=np.float64), affine, source, targets, got
            )
    return result


RENDERERS = [
    "medistill:auto",
    "medistill:joseph",
    "medistill:shear-warp",
    "nanodrr",
    "diffdrr:trilinear",
    "diffdrr:siddon",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pixels", type=int, default=2000, help="random pixels checked against Siddon")
    parser.add_argument("--renderers", default=",".join(RENDERERS))
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per (renderer, case)")
    parser.add_argument("--json", type=Path, help="also write all results here")
    parser.add_argument("--table-from", type=Path, help="print the table of a saved --json file and exit")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.table_from:
        saved = json.loads(args.table_from.read_text())
        print(_table(saved["rows"], saved["header"]))
        return
    if args.one:
        renderer, height, spacing, labels = json.loads(args.one)
        print(json.dumps(run_one(renderer, height, spacing, labels, args.repeats, args.pixels, args.cache)))
        return

    cache = Path(tempfile.mkdtemp(prefix="medistill-drr-bench-"))
    _load(cache)
    rows = []
    for height, spacing, labels in CASES:
        for renderer in args.renderers.split(","):
            repeats = args.repeats if not renderer.startswith("diffdrr") else max(1, args.repeats // 2)
            spec = json.dumps([renderer, height, spacing, labels])
            cmd = [
                sys.executable,
                __file__,
                "--one",
                spec,
                "--threads",
                str(args.threads),
                "--repeats",
                str(repeats),
                "--pixels",
                str(args.pixels),
                "--cache",
                str(cache),
            ]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                if done.returncode != 0:
                    lines = done.stderr.strip().splitlines() or ["?"]
                    result = {"error": lines[-1][:100]}
                else:
                    result = json.loads(done.stdout.strip().splitlines()[-1])
            except subprocess.TimeoutExpired:
                result = {"error": f"did not finish in {args.timeout:.0f} s"}
            result.update(renderer=renderer, height=height, spacing=spacing, labels=labels)
            rows.append(result)
            print(json.dumps(result), file=sys.stderr, flush=True)
    header = (
        f"machine: {platform.processor() or platform.machine()}, nproc {os.cpu_count()}, torch threads "
        f"{args.threads}, torch {torch.__version__}, load average at end {os.getloadavg()[0]:.1f}"
    )
    print(_table(rows, header))
    if args.json:
        args.json.write_text(json.dumps({"header": header, "rows": rows}, indent=1))


def _table(rows: list[dict], header: str) -> str:
    lines = [
        header,
        "",
        "| case | renderer | wall ms per DRR (min / median / max) | CPU ms per DRR (median) "
        "| wall / medistill | CPU / medistill | peak RSS MB | mean rel. error vs Siddon |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        case = f"{row['height']}x{row['height']} @ {row['spacing']} mm" + (
            " + labels" if row["labels"] else ""
        )
        if "error" in row:
            lines.append(f"| {case} | {row['renderer']} | not run: {row['error']} | | | | | |")
            continue
        wall, cpu = np.array(row["times_ms"]), np.array(row.get("cpu_ms", [np.nan]))
        ours = [
            r
            for r in rows
            if r["renderer"] == "medistill:auto"
            and r["height"] == row["height"]
            and r["labels"] == row["labels"]
            and "times_ms" in r
        ]
        ratio_wall = f"{np.median(wall) / np.median(ours[0]['times_ms']):.1f}x" if ours else ""
        ratio_cpu = (
            f"{np.median(cpu) / np.median(ours[0]['cpu_ms']):.1f}x" if ours and "cpu_ms" in ours[0] else ""
        )
        err = f"{row['rel_error'] * 100:.2f} %" if "rel_error" in row else "(same integrals)"
        if "unit_scale" in row:
            err += f" (after unit scale {row['unit_scale']:.4f})"
        channels = f" [{row['channels']} ch]" if row.get("channels") else ""
        lines.append(
            f"| {case} | {row['renderer']}{channels} | {wall.min():.0f} / {np.median(wall):.0f} / "
            f"{wall.max():.0f} | {np.median(cpu):.0f} | {ratio_wall} | {ratio_cpu} "
            f"| {row['peak_rss_mb']:.0f} | {err} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
