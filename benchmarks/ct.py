"""CT projector / FBP benchmark: medistill vs scikit-image ``radon``/``iradon`` and ASTRA (CPU).

Same 512 x 512 chest-ct slice (0.703 mm), same geometry for every tool: parallel beam, 720 views over
180 deg, 736 bins of one pixel; and a flat-detector fan beam (720 views over 360 deg, 736 bins; ASTRA's
CPU fan projector is flat only, and ASTRA has no CPU fan FBP). Each tool reconstructs its own projection
(noise-free round trip); RMSE is in HU inside the inscribed circle. Also: full metal-artifact simulation
throughput (pairs per second) on the ``deeplesion416`` preset.

The system-matrix build (once per geometry and machine: afterwards :func:`medistill.physics.ct.operator`
loads it from the disk cache) is timed apart from the per-slice times: ``build_s`` (a fresh build),
``store_s`` (writing it to the cache) and ``load_s`` (a later process loading it; measured in a temporary
cache folder, so the user's cache is not touched).

Run in .venv-bench (peers are never package dependencies):
    .venv-bench/bin/python benchmarks/ct.py [--repeat 3] [--json out.json]
A smoke run in seconds: ``benchmarks/ct.py --size 64 --repeat 1 --skip astra skimage sim``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from medistill.io import examples, tensor_cache
from medistill.io.axial import axial_slices
from medistill.io.images import read_image
from medistill.physics import ct, mar_classical, metal
from medistill.physics.attenuation import hu_to_mu, mu_to_hu

N, VIEWS, BINS, PIXEL_MM = 512, 720, 736, 0.703125
SOD_MM, SDD_MM = 595.0, 1085.6


def timed(fn: Callable[[], object], repeat: int) -> tuple[float, object]:
    """Best wall time (s) of ``repeat`` calls, and the last result."""
    best, out = math.inf, None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def set_size(n: int) -> None:
    """Scale the benchmark to ``n`` px (same field of view, views and bins in proportion): smoke runs."""
    global N, VIEWS, BINS, PIXEL_MM
    N, VIEWS, BINS, PIXEL_MM = n, 4 * round(720 * n / 512 / 4), round(736 * n / 512), 0.703125 * 512 / n


def load_slice(index: int = 66) -> np.ndarray:
    """Axial slice ``index`` of chest-ct (radiological view, HU clipped at -1024), area-resized to N."""
    image = read_image(examples.example_file("chest-ct", "cxr.nii.gz"))
    hu = np.clip(axial_slices(image.array, image.affine).slices[index], -1024, None).astype(np.float32)
    if hu.shape[-1] != N:
        hu = torch.nn.functional.interpolate(torch.from_numpy(hu)[None, None], size=(N, N), mode="area")[0, 0]
        hu = hu.numpy()
    return np.ascontiguousarray(hu)


def rmse_hu(mu_rec: np.ndarray, hu: np.ndarray) -> float:
    c = np.arange(N) - (N - 1) / 2
    fov = np.hypot(*np.meshgrid(c, c, indexing="ij")) < N / 2 - 2
    rec_hu = mu_to_hu(torch.from_numpy(np.asarray(mu_rec, np.float32))).numpy()
    return float(np.sqrt(np.mean((rec_hu - hu)[fov] ** 2)))


def geometries() -> dict[str, ct.CTGeometry]:
    half = math.asin(N / math.sqrt(2) * PIXEL_MM / SOD_MM)
    return {
        "parallel": ct.CTGeometry(
            N, PIXEL_MM, VIEWS, BINS, PIXEL_MM, beam="parallel", angle_range_rad=math.pi
        ),
        "fan-flat": ct.CTGeometry(
            N,
            PIXEL_MM,
            VIEWS,
            BINS,
            2 * SDD_MM * math.tan(half) / (BINS - 1),
            beam="fan",
            detector="flat",
            sod_mm=SOD_MM,
            sdd_mm=SDD_MM,
        ),  # fmt: skip
    }


def bench_medistill(name: str, g: ct.CTGeometry, hu: np.ndarray, repeat: int) -> dict[str, float]:
    mu = hu_to_mu(torch.from_numpy(hu))[None]
    t0 = time.perf_counter()
    op = ct.CTOperator(g)
    build = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as cache:  # the disk cache, as a later process sees it
        path = Path(cache) / f"{ct.matrix_key(g)}.pt"
        t0 = time.perf_counter()
        tensor_cache.save_tensors(path, op.matrices())
        store = time.perf_counter() - t0
        t0 = time.perf_counter()
        loaded = ct.CTOperator(g, matrices=tensor_cache.load_tensors(path))
        load = time.perf_counter() - t0
        cache_mb = path.stat().st_size / 2**20
        same = bool(torch.equal(loaded.project(mu), op.project(mu)))
        del loaded
    t_fp, sino = timed(lambda: op.project(mu), repeat)
    t_fbp, rec = timed(lambda: op.fbp(sino), repeat)
    t_bp, _ = timed(lambda: op.backproject(sino), repeat)
    batch = mu.expand(4, -1, -1).contiguous()
    t_fp4, sino4 = timed(lambda: op.project(batch), repeat)
    t_fbp4, _ = timed(lambda: op.fbp(sino4), repeat)
    return {
        "build_s": build, "store_s": store, "load_s": load, "cache_file_mb": cache_mb, "loaded_equal": same,
        "fp_s": t_fp, "bp_s": t_bp, "fbp_s": t_fbp, "fp_per_slice_b4_s": t_fp4 / 4,
        "fbp_per_slice_b4_s": t_fbp4 / 4, "rmse_hu": rmse_hu(rec[0].numpy(), hu),
        "matrix_nnz": float(op._a[0]._nnz()),
    }  # fmt: skip


def bench_skimage(hu: np.ndarray, repeat: int) -> dict[str, float]:
    from skimage.transform import iradon, radon

    mu_px = hu_to_mu(torch.from_numpy(hu)).numpy() * PIXEL_MM  # per pixel
    theta = np.arange(VIEWS) * 180.0 / VIEWS
    t_fp, sino = timed(lambda: radon(mu_px, theta=theta, circle=False), repeat)
    t_fbp, rec = timed(
        lambda: iradon(sino, theta=theta, filter_name="ramp", circle=False, output_size=N), repeat
    )
    return {
        "fp_s": t_fp,
        "fbp_s": t_fbp,
        "rmse_hu": rmse_hu(rec / PIXEL_MM, hu),
        "bins": float(sino.shape[0]),
    }


def bench_astra(name: str, hu: np.ndarray, repeat: int) -> dict[str, float]:
    import astra

    mu_px = (hu_to_mu(torch.from_numpy(hu)).numpy() * PIXEL_MM).astype(np.float32)
    vol = astra.create_vol_geom(N, N)
    if name == "parallel":
        angles = np.arange(VIEWS) * np.pi / VIEWS
        proj = astra.create_proj_geom("parallel", 1.0, BINS, angles)
        pid = astra.create_projector("linear", proj, vol)
    else:
        angles = np.arange(VIEWS) * 2 * np.pi / VIEWS
        g = geometries()["fan-flat"]
        proj = astra.create_proj_geom(
            "fanflat", g.bin_spacing / PIXEL_MM, BINS, angles, SOD_MM / PIXEL_MM, (SDD_MM - SOD_MM) / PIXEL_MM
        )
        pid = astra.create_projector("line_fanflat", proj, vol)

    def fp() -> np.ndarray:
        sid, sino = astra.create_sino(mu_px, pid)
        astra.data2d.delete(sid)
        return sino

    t_fp, sino = timed(fp, repeat)

    def bp() -> np.ndarray:
        bid, img = astra.create_backprojection(sino, pid)
        astra.data2d.delete(bid)
        return img

    t_bp, _ = timed(bp, repeat)
    out: dict[str, float] = {"fp_s": t_fp, "bp_s": t_bp}
    if name == "parallel":

        def fbp() -> np.ndarray:
            sid = astra.data2d.create("-sino", proj, sino)
            rid = astra.data2d.create("-vol", vol)
            cfg = astra.astra_dict("FBP")
            cfg.update(ProjectorId=pid, ProjectionDataId=sid, ReconstructionDataId=rid)
            cfg["option"] = {"FilterType": "Ram-Lak"}
            alg = astra.algorithm.create(cfg)
            astra.algorithm.run(alg)
            rec = astra.data2d.get(rid)
            astra.algorithm.delete(alg)
            astra.data2d.delete([sid, rid])
            return rec

        t_fbp, rec = timed(fbp, repeat)
        out |= {"fbp_s": t_fbp, "rmse_hu": rmse_hu(rec / PIXEL_MM, hu)}
    astra.projector.delete(pid)
    return out


def bench_simulation(hu: np.ndarray, repeat: int) -> dict[str, float]:
    g = ct.geometry_preset("deeplesion416", pixel_mm=PIXEL_MM * N / 416)
    small = torch.nn.functional.interpolate(torch.from_numpy(hu)[None, None], size=(416, 416), mode="area")[0]
    masks = torch.from_numpy(
        metal.random_metal_masks(small[0].numpy(), g.pixel_mm, 4, np.random.default_rng(0))
    )
    t0 = time.perf_counter()
    ct.operator(g, disk_cache=False)  # a fresh build, apart from the throughput
    build = time.perf_counter() - t0
    batch = small.expand(4, -1, -1).contiguous()
    gen = torch.Generator().manual_seed(0)
    t_sim, out = timed(lambda: metal.simulate_metal(batch, masks, g, generator=gen), repeat)

    def baselines() -> None:
        li = mar_classical.li_mar(out["sino_metal"], out["metal_trace"], g)
        mar_classical.nmar(out["sino_metal"], out["metal_trace"], g, li_mu=li)

    t_base, _ = timed(baselines, repeat)
    return {
        "build_s": build, "pairs_per_s": 4 / t_sim, "pairs_per_s_with_li_nmar": 4 / (t_sim + t_base),
        "batch": 4.0,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", default=None)
    parser.add_argument("--skip", nargs="*", default=[], help="parts to skip: medistill skimage astra sim")
    parser.add_argument("--size", type=int, default=512, help="image size (px); 512 = the recorded runs")
    args = parser.parse_args()
    set_size(args.size)
    hu = load_slice()
    results: dict[str, object] = {
        "machine": platform.processor() or platform.machine(), "nproc": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "repeat": args.repeat,
        "size": N,
    }  # fmt: skip
    for name, g in geometries().items():
        if "medistill" not in args.skip:
            results[f"medistill/{name}"] = bench_medistill(name, g, hu, args.repeat)
            print(name, "medistill", results[f"medistill/{name}"], flush=True)
        if "astra" not in args.skip:
            try:
                results[f"astra-cpu/{name}"] = bench_astra(name, hu, args.repeat)
            except ImportError:
                results[f"astra-cpu/{name}"] = "not installed"
            print(name, "astra", results[f"astra-cpu/{name}"], flush=True)
    if "skimage" not in args.skip:
        results["skimage/parallel"] = bench_skimage(hu, args.repeat)
        print("skimage", results["skimage/parallel"], flush=True)
    if "sim" not in args.skip:
        results["simulation/deeplesion416"] = bench_simulation(hu, args.repeat)
        print("simulation", results["simulation/deeplesion416"], flush=True)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
