"""``medistill simulate metal`` and ``medistill report metal``: paired metal-artifact CT slices.

Why a resumable shard writer: a MAR training set (DGKD, DuDoNet, InDuDoNet) is thousands of simulated
pairs made once and reused. Each input slice becomes one ``slice_XXXXX.npz`` shard written atomically, so
an interrupted run continues where it stopped, and every random draw is seeded by ``(seed, slice)``, so
a resumed or repeated run writes the same numbers. All input problems (geometry preset, photon count,
metal, slice shape and spacing, masks outside the field of view) are reported before the first slice.

Slices: a 3D volume (NIfTI/MHA/DICOM series) is cut into axial slices by its affine
(:func:`medistill.io.axial.axial_slices`): whatever its axis order, slices run inferior -> superior
(``--slices`` counts them so), rows anterior -> posterior, columns patient right -> left (the radiological
view, as a DICOM axial slice is stored), so every storage order of one CT gives the same shards. A single
2D DICOM slice is brought to the same orientation from its patient orientation; a 2D image without one
(identity direction) is used as displayed. ``--mask-file`` masks are taken in that slice orientation.
Slices are resampled (area averaging) to the preset's image size, and the preset scanner is scaled to
the resulting pixel size (the InDuDoNet convention of a fixed geometry in pixel units).

Sharding: ``--shard K/N`` simulates only every N-th of the chosen slices starting at the K-th, so the N
parts of an array job (any scheduler) write exactly the shards one machine writes (randomness is seeded
per slice); each part writes ``index.part-K-of-N.csv`` and the last one to finish merges them into
``index.csv``, identical to a single run's.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import typer

from medistill.cli import report_app, simulate_app
from medistill.errors import MedistillError
from medistill.io.atomic import atomic_savez, atomic_write_text
from medistill.io.axial import axial_slices
from medistill.io.checks import check_output_folder, read_ct
from medistill.io.images import read_image
from medistill.physics import ct, mar_classical, metal
from medistill.physics.attenuation import mu_to_hu
from medistill.physics.materials import kramers_spectrum

INDEX = "index.csv"
SETTINGS = "simulation.json"
INDEX_COLUMNS = (
    "sample",
    "shard",
    "slice",
    "mask",
    "metal_px",
    "rmse_artifact_hu",
    "rmse_li_hu",
    "rmse_nmar_hu",
)


def _parse_slices(text: str | None, depth: int) -> range:
    if text is None:
        return range(depth)
    try:
        a, b = (int(v) if v else None for v in text.split(":"))
    except ValueError:
        raise MedistillError(
            f"--slices: expected A:B (python slice of slice indices), got {text!r}"
        ) from None
    chosen = range(depth)[slice(a, b)]
    if len(chosen) == 0:
        raise MedistillError(f"--slices {text} selects no slice of a volume with {depth} slices")
    return chosen


def _load_slices(path: Path, assume_ct: bool = False) -> tuple[np.ndarray, float]:
    """Axial ``S H W`` slices in HU (clipped at -1024), canonical orientation, and the pixel size (mm).

    Checks CT, square pixels and square slices.
    """
    image = read_ct(path, assume_ct)
    array = np.asarray(image.array, dtype=np.float32)
    if array.ndim == 2 and np.allclose(image.direction, np.eye(3)):  # no patient orientation: as displayed
        slices, (row_mm, col_mm) = array[None], image.spacing
    elif array.ndim in (2, 3):
        axial = axial_slices(array if array.ndim == 3 else array[..., None], image.affine)
        if array.ndim == 2 and axial.source_axes[0] != 2:
            raise MedistillError(f"{path}: this 2D image is not an axial slice (its normal is not head-foot)")
        slices, (_, row_mm, col_mm) = axial.slices, axial.spacing_mm
    else:
        raise MedistillError(f"{path}: expected a 2D slice or a 3D volume, got shape {array.shape}")
    if abs(row_mm - col_mm) > 0.01 * max(row_mm, col_mm):
        raise MedistillError(f"{path}: in-plane spacing must be square, got {row_mm:g} x {col_mm:g} mm")
    if slices.shape[1] != slices.shape[2]:
        raise MedistillError(f"{path}: slices must be square, got {slices.shape[1]} x {slices.shape[2]}")
    return np.clip(slices, -1024.0, None), float(col_mm)


def _resample(slices: np.ndarray, size: int) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(slices))[:, None]
    if t.shape[-1] == size:
        return t[:, 0]
    mode = "area" if t.shape[-1] > size else "bilinear"
    return F.interpolate(t, size=(size, size), mode=mode)[:, 0]


def _load_mask_file(path: Path, geometry: ct.CTGeometry) -> torch.Tensor:
    image = read_image(path)
    array = np.asarray(image.array)
    array = array if array.ndim == 2 else array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array
    if array.ndim != 2:
        raise MedistillError(f"--mask-file {path}: expected one 2D mask, got shape {array.shape}")
    mask = torch.from_numpy((array > 0).astype(np.float32))[None, None]
    mask = F.interpolate(mask, size=(geometry.image_size,) * 2, mode="nearest")[0, 0] > 0
    if not mask.any():
        raise MedistillError(f"--mask-file {path}: the mask is empty")
    metal.check_metal_in_fov(mask[None], geometry)
    return mask


def _rmse(image: torch.Tensor, clean: torch.Tensor, mask: torch.Tensor) -> float:
    keep = ~mask
    return float((image - clean)[keep].pow(2).mean().sqrt())


def simulate_slice(
    hu: torch.Tensor,
    masks: torch.Tensor,
    geometry: ct.CTGeometry,
    scan: metal.MetalScan,
    generator: torch.Generator,
    baselines: bool,
) -> dict[str, np.ndarray]:
    """K samples of one slice (``hu``: ``H W``; ``masks``: ``K H W``) as numpy arrays with leading K."""
    k = masks.shape[0]
    out = metal.simulate_metal(hu.expand(k, -1, -1), masks, geometry, scan, generator)
    arrays = {name: out[name] for name in ("clean_hu", "artifact_hu", "free_hu", "metal_mask")}
    arrays |= {name: out[name] for name in ("sino_clean", "sino_metal", "metal_trace")}
    if baselines:
        li = mar_classical.li_mar(out["sino_metal"], out["metal_trace"], geometry, scan.filter_name)
        nm = mar_classical.nmar(out["sino_metal"], out["metal_trace"], geometry, scan.filter_name, li_mu=li)
        arrays["li_hu"], arrays["nmar_hu"] = mu_to_hu(li), mu_to_hu(nm)
    return {
        name: v.cpu().numpy().astype(np.uint8 if v.dtype == torch.bool else np.float32)
        for name, v in arrays.items()
    }


def _index_rows(shard: Path, slice_index: int, arrays: dict[str, np.ndarray]) -> list[dict[str, object]]:
    rows = []
    for m in range(arrays["metal_mask"].shape[0]):
        t = {name: torch.from_numpy(arrays[name][m]) for name in arrays if name.endswith("_hu")}
        mask = torch.from_numpy(arrays["metal_mask"][m].astype(bool))
        row: dict[str, object] = {
            "sample": f"{shard.stem}_m{m}", "shard": shard.name, "slice": slice_index, "mask": m,
            "metal_px": int(mask.sum()),
            "rmse_artifact_hu": round(_rmse(t["artifact_hu"], t["clean_hu"], mask), 2),
        }  # fmt: skip
        for key in ("li", "nmar"):
            row[f"rmse_{key}_hu"] = (
                round(_rmse(t[f"{key}_hu"], t["clean_hu"], mask), 2) if f"{key}_hu" in t else ""
            )
        rows.append(row)
    return rows


@simulate_app.command("metal")
def simulate_metal_cmd(
    ct_path: Path = typer.Argument(..., help="CT volume (NIfTI/MHA/DICOM folder) or one 2D DICOM slice, HU."),
    out: Path = typer.Option(..., "--out", help="Output folder (shards, index.csv, simulation.json)."),
    slices: str | None = typer.Option(
        None, "--slices", help="Range A:B of axial slices, counted from the feet."
    ),
    masks_per_slice: int = typer.Option(
        1, "--masks-per-slice", min=1, help="Metal masks (samples) per slice."
    ),
    geometry_name: str = typer.Option("deeplesion416", "--geometry", help=f"One of {sorted(ct.PRESETS)}."),
    photons: float = typer.Option(1e6, "--photons", help="Incident photons per bin and view (I0)."),
    metal_name: str = typer.Option("titanium", "--metal", help=f"Metal material: {', '.join(metal.METALS)}."),
    kvp: float = typer.Option(120.0, "--kvp", help="Tube voltage of the Kramers spectrum."),
    scatter: float = typer.Option(0.0, "--scatter-photons", help="Constant scatter photons per bin."),
    mask_file: Path | None = typer.Option(
        None, "--mask-file", help="Use this 2D mask instead of random ones."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed: the same seed gives the same output."),
    baselines: bool = typer.Option(False, "--baselines", help="Also write LI and NMAR reconstructions."),
    device: str = typer.Option("cpu", "--device", help="torch device, e.g. cpu or cuda."),
    shard: str | None = typer.Option(
        None, "--shard", help="K/N: only the K-th (1..N) of N interleaved parts of the slices (array jobs)."
    ),
    assume_ct: bool = typer.Option(
        False, "--assume-ct", help="Take the input as CT in HU even if its tags or values say otherwise."
    ),
) -> None:
    """Insert metal into clean CT slices and simulate polychromatic, noisy scans (+ LI/NMAR baselines)."""
    from rich.progress import track

    check_output_folder(out, inputs=[ct_path])
    base = ct.geometry_preset(geometry_name)
    scan = metal.MetalScan(metal=metal_name, photons=photons, kvp=kvp, scatter_photons=scatter)
    kramers_spectrum(scan.kvp, scan.filtration_mm_al)  # validates kVp before any work
    part, parts = _parse_shard(shard)
    volume, pixel_mm = _load_slices(ct_path, assume_ct)
    chosen = _parse_slices(slices, volume.shape[0])
    geometry = base.with_pixel_mm(pixel_mm * volume.shape[-1] / base.image_size)
    fixed_mask = _load_mask_file(mask_file, geometry) if mask_file is not None else None
    settings = {
        "input": str(ct_path), "geometry_preset": geometry_name, "geometry": asdict(geometry),
        "scan": asdict(scan), "seed": seed, "masks_per_slice": masks_per_slice, "baselines": baselines,
        "mask_file": None if mask_file is None else str(mask_file),
        "orientation": "axial slices inferior->superior; rows anterior->posterior, columns right->left",
        "arrays": "clean_hu artifact_hu free_hu [li_hu nmar_hu]: K H W HU; metal_mask: K H W uint8; "
        "sino_clean (70 keV line integrals), sino_metal (measured, water-BHC): K V B; "
        "metal_trace: K V B uint8",
    }  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    settings_path = out / SETTINGS
    if settings_path.exists():
        previous = json.loads(settings_path.read_text())
        if {k: previous.get(k) for k in settings if k != "input"} != {
            k: v for k, v in settings.items() if k != "input"
        }:
            raise MedistillError(f"{out} holds a simulation with other settings; use a new --out folder")
    atomic_write_text(settings_path, json.dumps(settings, indent=2))
    mine = [z for i, z in enumerate(chosen) if i % parts == part - 1]  # this part's slices
    # per slice: a subset resamples identically
    hu_all = _resample(volume[mine], geometry.image_size) if mine else None
    rows: list[dict[str, object]] = []
    for i, slice_index in enumerate(track(mine, description="metal slices")):
        shard = out / f"slice_{slice_index:05d}.npz"
        if shard.exists():  # written atomically: complete
            with np.load(shard) as done:
                arrays = {k: done[k] for k in done.files}
        else:
            hu = hu_all[i].to(device)  # type: ignore[index]
            if fixed_mask is not None:
                masks = fixed_mask.to(device).expand(masks_per_slice, -1, -1)
            else:
                rng = np.random.default_rng([seed, slice_index])
                masks = torch.from_numpy(
                    metal.random_metal_masks(hu.cpu().numpy(), geometry.pixel_mm, masks_per_slice, rng)
                ).to(device)
            generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + slice_index)
            arrays = simulate_slice(hu, masks, geometry, scan, generator, baselines)
            atomic_savez(shard, arrays)
        rows.extend(_index_rows(shard, slice_index, arrays))
    if parts == 1:
        _write_index(out / INDEX, rows)
    else:  # each part writes its rows; the last part to finish merges them in slice order
        _write_index(out / f"index.part-{part}-of-{parts}.csv", rows)
        part_files = [out / f"index.part-{k}-of-{parts}.csv" for k in range(1, parts + 1)]
        if all(p.is_file() for p in part_files):
            merged: list[dict[str, object]] = []
            for p in part_files:
                with open(p) as f:
                    merged.extend(csv.DictReader(f))
            position = {z: i for i, z in enumerate(chosen)}
            merged.sort(key=lambda r: (position[int(str(r["slice"]))], int(str(r["mask"]))))
            _write_index(out / INDEX, merged)
    typer.echo(f"{len(rows)} samples from {len(mine)} slices (part {part}/{parts}) in {out}")


def _parse_shard(text: str | None) -> tuple[int, int]:
    """``K/N`` -> ``(K, N)`` with 1 <= K <= N; ``None`` -> ``(1, 1)``."""
    if text is None:
        return 1, 1
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise MedistillError(f"--shard: expected K/N (e.g. 2/8), got {text!r}") from None
    if not 1 <= k <= n:
        raise MedistillError(f"--shard {text}: need 1 <= K <= N")
    return k, n


def _write_index(path: Path, rows: list[dict[str, object]]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=INDEX_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, text.getvalue())


@report_app.command("metal")
def report_metal_cmd(
    folder: Path = typer.Argument(..., help="Output folder of `medistill simulate metal`."),
    out: Path | None = typer.Option(None, "--out", help="PNG path (default FOLDER/metal_samples.png)."),
    samples: int = typer.Option(4, "--samples", min=1, help="Number of samples (rows) to show."),
    window: str = typer.Option("-400,600", "--window", help="HU display window lo,hi."),
) -> None:
    """Figure: clean | metal | artifact | LI | NMAR for the first samples of a simulation folder."""
    from medistill.report.metal_figures import metal_figure

    index = folder / INDEX
    if not index.is_file():
        raise MedistillError(f"{folder} has no {INDEX}; run `medistill simulate metal` first")
    try:
        lo, hi = (float(v) for v in window.split(","))
    except ValueError:
        raise MedistillError(f"--window: expected lo,hi in HU, got {window!r}") from None
    with open(index) as f:
        rows = list(csv.DictReader(f))[:samples]
    chosen, titles = [], []
    for row in rows:
        with np.load(folder / row["shard"]) as data:
            m = int(row["mask"])
            chosen.append({k: data[k][m] for k in data.files if k.endswith("_hu") or k == "metal_mask"})
        titles.append(row["sample"])
    target = out or folder / "metal_samples.png"
    metal_figure(chosen, target, (lo, hi), titles)
    typer.echo(f"wrote {target}")
