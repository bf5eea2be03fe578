"""``medistill simulate drr`` and ``medistill report drr``: DRRs with projected labels from a CT.

Why a resumable, geometry-first writer: a training set of thousands of DRRs is generated once and reused;
an interrupted run must continue where it stopped (each image is written atomically, so an existing file is
complete), and every image must come with its exact camera (3x4 ``P``, source, detector) so that labels,
landmarks and real radiographs can be related to the CT later. All input problems are reported before the
first render.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import typer

from medistill.cli import report_app, simulate_app
from medistill.errors import MedistillError
from medistill.io.atomic import atomic_path, atomic_write_text
from medistill.io.checks import check_output_folder, require_ct
from medistill.io.images import Image, check_same_grid, read_image, write_image
from medistill.physics.attenuation import EFFECTIVE_KEV, MU_WATER_PER_MM, hu_to_mu
from medistill.physics.drr import METHODS, DRRRenderer, display_image
from medistill.physics.geometry import (
    PRESET_MIRROR,
    VIEWS,
    Detector,
    Pose,
    projection_matrix,
    random_poses,
    view_pose,
    volume_centre_mm,
)

GEOMETRY_FILE = "geometry.json"
PIXEL_CONVENTION = (
    "pixel (row, col) has its centre at (u, v) = (col, row), 0-based; P @ [x, y, z, 1] ~ [u, v, 1]; "
    "NIfTI arrays are (row, col[, label channel])"
)
WORLD_CONVENTION = "RAS+ millimetres of the input CT's affine (voxel (i, j, k) -> world)"


def _parse_floats(text: str, count: int, name: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise MedistillError(f"--{name}: expected {count} comma-separated numbers, got {text!r}") from None
    if len(values) != count:
        raise MedistillError(f"--{name}: expected {count} comma-separated numbers, got {text!r}")
    return values


def _parse_label_ids(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        ids = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise MedistillError(f"--label-ids: expected integers like 1,2,5, got {text!r}") from None
    if not ids or any(v <= 0 for v in ids):
        raise MedistillError(f"--label-ids: expected positive label values, got {text!r}")
    return ids


def _poses(
    pose: str,
    around: str,
    n: int,
    centre: torch.Tensor,
    sid_mm: float,
    seed: int,
    angle_range_deg: tuple[float, ...],
    shift_range_mm: tuple[float, ...],
) -> tuple[Pose, str]:
    """All ``n`` poses up front (deterministic for ``seed``), and the view that sets the display mirror."""
    if pose == "random":
        generator = torch.Generator().manual_seed(seed)
        return random_poses(
            n,
            around,
            centre,
            sid_mm,
            angle_range_deg=angle_range_deg,  # type: ignore[arg-type]
            shift_range_mm=shift_range_mm,
            generator=generator,
        ), around  # type: ignore[arg-type]
    one = view_pose(pose, centre, sid_mm)
    return Pose(one.rotation.expand(n, 3, 3), one.translation_mm.expand(n, 3)), pose


def _check_source_outside(poses: Pose, shape: tuple[int, ...], affine: np.ndarray) -> None:
    inv = np.linalg.inv(affine)
    for index, source in enumerate(poses.source_mm.numpy()):
        voxel = inv[:3, :3] @ source + inv[:3, 3]
        if np.all((voxel > -0.5) & (voxel < np.array(shape) - 0.5)):
            raise MedistillError(
                f"pose {index}: the X-ray source at {np.round(source, 1).tolist()} mm is inside the CT "
                "volume; "
                "increase --sid"
            )


def _write_png16(image01: np.ndarray, path: Path) -> None:
    from PIL import Image as PILImage

    with atomic_path(path) as tmp:
        PILImage.fromarray((image01 * 65535.0 + 0.5).astype(np.uint16)).save(tmp, format="PNG")


@simulate_app.command("drr")
def simulate_drr(
    ct: Path = typer.Argument(..., help="CT volume in HU (NIfTI, MHA/NRRD or a DICOM series folder)."),
    out: Path = typer.Option(
        ..., "--out", help="Output folder (created; existing complete images are kept)."
    ),
    labels: Path | None = typer.Option(None, "--labels", help="Label map on the CT's grid."),
    label_ids: str | None = typer.Option(
        None, "--label-ids", help="Labels to project, e.g. 1,2,5 (default all)."
    ),
    n: int = typer.Option(1, "--n", help="Number of DRRs."),
    pose: str = typer.Option("ap", "--pose", help="ap | pa | lateral | random."),
    around: str = typer.Option("ap", "--around", help="View that random poses vary around."),
    angle_range: str = typer.Option(
        "15,10,5", "--angle-range", help="Random +- degrees: about superior axis, right-left axis, beam."
    ),
    shift_range: str = typer.Option(
        "10,10,10", "--shift-range", help="Random +- isocentre shift in mm (x,y,z)."
    ),
    sdd: float = typer.Option(1020.0, "--sdd", help="Source-to-detector distance (mm)."),
    sid: float = typer.Option(
        850.0, "--sid", help="Source-to-isocentre distance (mm); isocentre = CT centre."
    ),
    height: int = typer.Option(200, "--height", help="Detector rows."),
    width: int = typer.Option(200, "--width", help="Detector columns."),
    spacing: float = typer.Option(2.0, "--spacing", help="Detector pixel size (mm)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random poses."),
    mu_water: float = typer.Option(
        MU_WATER_PER_MM, "--mu-water", help=f"mu of water (1/mm); default: water at {EFFECTIVE_KEV:g} keV."
    ),
    method: str = typer.Option("auto", "--method", help="auto | joseph | shear-warp."),
    assume_ct: bool = typer.Option(
        False, "--assume-ct", help="Take the CT as HU even if its tags or values say otherwise."
    ),
) -> None:
    """Render DRRs (line integrals, 16-bit PNG) and binary projected label masks from a CT."""
    from rich.progress import track

    # --- every check before the first render ---
    if n <= 0:
        raise MedistillError(f"--n must be positive, got {n}")
    if pose not in (*VIEWS, "random"):
        raise MedistillError(f"--pose must be one of {', '.join(VIEWS)}, random; got {pose!r}")
    if around not in VIEWS:
        raise MedistillError(f"--around must be one of {', '.join(VIEWS)}; got {around!r}")
    if method not in METHODS:
        raise MedistillError(f"--method must be one of {', '.join(METHODS)}; got {method!r}")
    if sid <= 0 or sdd <= 0:
        raise MedistillError(f"--sid and --sdd must be positive, got {sid} and {sdd} mm")
    angles = _parse_floats(angle_range, 3, "angle-range")
    shifts = _parse_floats(shift_range, 3, "shift-range")
    ids = _parse_label_ids(label_ids)
    check_output_folder(out, inputs=[ct, *([labels] if labels else [])])
    detector = Detector(
        height, width, (spacing, spacing), sdd, mirror=PRESET_MIRROR[pose if pose != "random" else around]
    )
    image = read_image(ct)
    if image.array.ndim != 3:
        raise MedistillError(f"{ct}: a DRR needs a 3D CT volume, got an array of shape {image.array.shape}")
    require_ct(image, str(ct), assume_ct)
    label_image = None
    if labels is not None:
        label_image = read_image(labels)
        check_same_grid(image, label_image, str(ct), str(labels))
        if ids is not None:
            present = set(np.unique(label_image.array).astype(int).tolist())
            missing = [v for v in ids if v not in present]
            if missing:
                raise MedistillError(f"{labels}: label values {missing} do not occur in the label map")
    elif ids is not None:
        raise MedistillError("--label-ids needs --labels")
    centre = volume_centre_mm(image.array.shape, torch.tensor(image.affine))
    poses, view = _poses(pose, around, n, centre, sid, seed, angles, shifts)
    _check_source_outside(poses, image.array.shape, image.affine)

    settings = {
        "ct": str(Path(ct).resolve()),
        "labels": str(Path(labels).resolve()) if labels else None,
        "pose": pose,
        "around": around,
        "angle_range_deg": list(angles),
        "shift_range_mm": list(shifts),
        "n": n,
        "seed": seed,
        "sdd_mm": sdd,
        "sid_mm": sid,
        "mu_water_per_mm": mu_water,
        "detector": detector.to_dict(),
    }
    out.mkdir(parents=True, exist_ok=True)
    geometry_path = out / GEOMETRY_FILE
    if geometry_path.exists():
        previous = json.loads(geometry_path.read_text())
        if previous.get("settings") != settings:
            raise MedistillError(f"{out} holds DRRs made with other settings; choose a new --out")

    mu = hu_to_mu(torch.from_numpy(np.asarray(image.array, dtype=np.float32)), mu_water)
    label_tensor = (
        None if label_image is None else torch.from_numpy(np.asarray(label_image.array).astype(np.int64))
    )
    renderer = DRRRenderer(mu, torch.tensor(image.affine), label_tensor, ids, method=method)
    p_matrices = projection_matrix(detector, poses)
    entries = {}
    for index in track(range(n), description="DRRs"):
        image_id = f"{index:04d}"
        files = {"lineint": out / f"{image_id}_lineint.nii.gz", "drr": out / f"{image_id}_drr.png"}
        if label_tensor is not None:
            files["labels"] = out / f"{image_id}_labels.nii.gz"
        if not all(path.exists() for path in files.values()):
            with torch.no_grad():
                result = renderer.render(detector, poses[index])
            line = result.line_integral[0].float().numpy()
            if "labels" in files:
                masks = result.label_mask[0].permute(1, 2, 0).numpy().astype(np.uint8)  # H W C
                write_image(Image(masks, _pixel_affine(spacing)), files["labels"], dtype=np.uint8)
            _write_png16(display_image(result.line_integral[0]).numpy(), files["drr"])
            write_image(Image(line, _pixel_affine(spacing)), files["lineint"], dtype=np.float32)
        entries[image_id] = {
            "P": p_matrices[index].tolist(),
            "source_mm": poses.source_mm[index].tolist(),
            "rotation": poses.rotation[index].tolist(),
            "translation_mm": poses.translation_mm[index].tolist(),
            "sdd_mm": sdd,
            "height": height,
            "width": width,
            "spacing_mm": [spacing, spacing],
            "files": {key: path.name for key, path in files.items()},
        }
    document = {
        "settings": settings,
        "view": view,
        "pixel_convention": PIXEL_CONVENTION,
        "world_convention": WORLD_CONVENTION,
        "line_integral_unit": "mu x mm (dimensionless); intensity = exp(-line integral)",
        "label_ids": renderer.label_ids,
        "images": entries,
    }
    atomic_write_text(geometry_path, json.dumps(document, indent=1))
    typer.echo(f"{n} DRRs in {out}")


def _pixel_affine(spacing_mm: float) -> np.ndarray:
    """Pixel (row, col[, channel]) -> detector-plane mm; the pose in the world is in geometry.json."""
    return np.diag([spacing_mm, spacing_mm, 1.0, 1.0])


@report_app.command("drr")
def report_drr(
    folder: Path = typer.Argument(..., help="Folder written by `medistill simulate drr`."),
    out: Path | None = typer.Option(None, "--out", help="PNG to write (default FOLDER/drr_grid.png)."),
    max_images: int = typer.Option(8, "--max", help="At most this many DRRs in the grid."),
) -> None:
    """A PNG grid of the DRRs with their projected label masks as coloured outlines."""
    from medistill.report.drr_figures import drr_grid

    target = out or folder / "drr_grid.png"
    drr_grid(folder, target, max_images=max_images)
    typer.echo(f"wrote {target}")
