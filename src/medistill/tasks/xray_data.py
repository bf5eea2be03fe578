"""DRR training sets for X-ray bone segmentation (seed D, spec D.2), rendered once and cached as npz.

The original (Nottingham carpal-bone project, ``genData.m``) summed normalised voxel values along
parallel rays, drew the *first-hit* label per ray, resized label PNGs bicubically and split train/val by
projection of the same wrists. Here, instead:

* **Physics**: cone-beam DRRs of ``mu = mu_water (1 + HU/1000)`` by :class:`medistill.physics.drr.
  DRRRenderer` (spacing-aware, perspective), at the model's size directly, so nothing is resized.
* **Labels**: per-class path lengths thresholded to binary masks (multi-label: bones overlap lungs and
  each other in projection), rendered in the same geometry; never interpolated as values.
* **Classes** (chest, not wrist: the data we have is the ``chest-ct`` example with its TotalSegmentator
  label map): groups of structures by name in ``structures.csv``, see :data:`CLASS_GROUPS`.
* **Split by pose range**: one CT is not a cohort, so what is held out is *pose*: training and validation
  poses have obliquity ``max(|LAO/RAO|, |cranio-caudal|) < 10 deg``, test poses ``10..15 deg``
  (configurable; :func:`check_disjoint` refuses overlapping ranges). Every table says "one CT".
* **Augmentation** (training only, on the line integrals, so it acts where a detector would): scatter
  haze, Poisson quantum noise, detector blur, window/gamma/contrast jitter, electronic noise, collimation
  borders (labels cleared under the collimator, where no anatomy is visible); see :func:`augment`.
  No flips: chest films have a handedness (heart on the image's right for PA/AP).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from scipy import ndimage

from medistill.config import StrictModel
from medistill.engine.data import KeyedDataset
from medistill.errors import MedistillError
from medistill.io.atomic import atomic_savez
from medistill.io.images import check_same_grid, read_image
from medistill.transforms.gradient import prepare_input

#: Output classes -> structure-name prefixes in TotalSegmentator's ``structures.csv``. Costal cartilage is
#: not bone (and is not counted as rib); the lung lobes form one lung class.
CLASS_GROUPS: dict[str, tuple[str, ...]] = {
    "ribs": ("rib_left_", "rib_right_"),
    "vertebrae": ("vertebrae_",),
    "clavicles": ("clavicula_",),
    "scapulae": ("scapula_",),
    "sternum": ("sternum",),
    "humeri": ("humerus_",),
    "lungs": ("lung_",),
    "heart": ("heart",),
}


#: Bump when rendering changes so cached npz files are not reused (2: PA views mirrored for display).
RENDER_VERSION = 2


class PoseRange(StrictModel):
    """Poses around a frontal view: C-arm angles, distances and shifts, each drawn uniformly."""

    obliquity_deg: tuple[float, float] = Field(
        (0.0, 10.0),
        description="[lo, hi) of max(|LAO/RAO rotation|, |cranio-caudal tilt|) in degrees",
    )
    roll_deg: float = Field(3.0, ge=0, description="in-plane roll, uniform in +-roll_deg")
    sdd_mm: tuple[float, float] = Field((1000.0, 1300.0), description="source-to-detector distance range")
    air_gap_mm: tuple[float, float] = Field(
        (150.0, 300.0), description="isocentre-to-detector distance range (SID = SDD - gap)"
    )
    shift_mm: float = Field(20.0, ge=0, description="isocentre (table) shift, uniform in +-shift_mm per axis")
    detector_shift_px: float = Field(4.0, ge=0, description="principal-point shift, uniform in +-px")
    views: list[Literal["ap", "pa"]] = Field(["pa", "ap"], min_length=1)

    @model_validator(mode="after")
    def _ordered(self) -> PoseRange:
        lo, hi = self.obliquity_deg
        if not 0 <= lo < hi <= 60:
            raise ValueError(f"obliquity_deg must satisfy 0 <= lo < hi <= 60, got {self.obliquity_deg}")
        if self.sdd_mm[0] > self.sdd_mm[1] or self.air_gap_mm[0] > self.air_gap_mm[1]:
            raise ValueError("ranges must be given as [low, high]")
        return self


class Augment(StrictModel):
    """Training-time radiograph augmentation (probabilities and ranges); see :func:`augment`."""

    enabled: bool = True
    scatter_fraction: tuple[float, float] = (0.0, 0.4)
    photons: tuple[float, float] = Field((2e3, 5e4), description="incident photons per pixel (log-uniform)")
    blur_px: tuple[float, float] = (0.0, 1.0)
    gamma_log_sd: float = 0.25
    contrast: tuple[float, float] = (0.85, 1.15)
    brightness: float = 0.05
    noise_sd: tuple[float, float] = (0.0, 0.02)
    collimation_p: float = Field(0.3, ge=0, le=1)
    collimation_max: float = Field(0.12, ge=0, lt=0.5, description="max border width, fraction of the side")


class XrayData(StrictModel):
    example: str | None = Field("chest-ct", description="example set providing cxr.nii.gz + mask.nii.gz")
    image: Path | None = Field(None, description="CT volume in HU (used instead of `example`)")
    label: Path | None = Field(None, description="TotalSegmentator-style label map on the CT grid")
    structures: Path | None = Field(None, description="structures.csv naming the label ids")
    classes: list[str] = Field(list(CLASS_GROUPS), min_length=1, description="output classes, in order")
    size: int = Field(128, ge=16, description="detector / model size in pixels (square)")
    field_mm: float = Field(430.0, gt=0, description="detector side in mm (a 43 cm flat panel)")
    volume_step: tuple[int, int, int] = Field(
        (4, 4, 1), description="CT voxels per rendering voxel along each axis (HU averaged, labels nearest)"
    )
    pose_seed: int | None = Field(
        None,
        description="seed of the DRR poses (default: the experiment seed); fix it so that stages trained "
        "with other seeds (`set: {seed: N}`) share one rendered set",
    )
    n_train: int = Field(48, ge=1)
    n_val: int = Field(8, ge=1)
    n_test: int = Field(16, ge=1)
    train_poses: PoseRange = PoseRange()
    test_poses: PoseRange = PoseRange(obliquity_deg=(10.0, 15.0))
    window_percentiles: tuple[float, float] = (0.5, 99.5)
    augment: Augment = Augment()
    preprocessing: str = Field(
        "none", description="network input: none | global_gradient | local_gradient (set per stage)"
    )

    @model_validator(mode="after")
    def _check(self) -> XrayData:
        from medistill.transforms.gradient import PREPROCESSING

        unknown = [c for c in self.classes if c not in CLASS_GROUPS]
        if unknown:
            raise ValueError(f"unknown classes {unknown}; choose from {', '.join(CLASS_GROUPS)}")
        if self.preprocessing not in PREPROCESSING:
            raise ValueError(
                f"unknown pre-processing {self.preprocessing!r}; choose from {', '.join(PREPROCESSING)}"
            )
        check_disjoint(self.train_poses, self.test_poses)
        return self


def check_disjoint(train: PoseRange, test: PoseRange) -> None:
    """Refuse test obliquities that overlap the training range (the test must be poses never seen)."""
    a, b = train.obliquity_deg, test.obliquity_deg
    if a[0] < b[1] and b[0] < a[1]:
        raise ValueError(f"test obliquity {b} deg overlaps the training range {a} deg; make them disjoint")


# ------------------------------------------------------------------------------------------- volume


def class_ids(structures_csv: Path, classes: list[str]) -> dict[str, list[int]]:
    """Label ids of each output class, from the structure names in ``structures.csv`` (columns
    ``structure``, ``id``)."""
    with open(structures_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"structure", "id"} <= set(rows[0]):
        raise MedistillError(f"{structures_csv}: expected columns 'structure' and 'id'")
    return {c: [int(r["id"]) for r in rows if r["structure"].startswith(CLASS_GROUPS[c])] for c in classes}


@dataclass
class Volume:
    """A CT ready to render: ``mu_per_mm`` (I J K), grouped ``labels`` (I J K; 0 none, c+1 class c),
    ``affine`` (4 4) voxel -> RAS mm."""

    mu_per_mm: torch.Tensor
    labels: torch.Tensor
    affine: torch.Tensor


def block_downsample(hu: np.ndarray, labels: np.ndarray, affine: np.ndarray, step: tuple[int, int, int]):
    """HU averaged over ``step`` blocks; labels *picked* at each block's centre voxel (nearest, never
    averaged); the affine moved to the block centres. Returns ``(hu, labels, affine)``."""
    s = tuple(int(v) for v in step)
    if min(s) < 1:
        raise MedistillError(f"volume_step must be positive, got {step}")
    shape = tuple(n // k * k for n, k in zip(hu.shape, s, strict=True))
    h = hu[: shape[0], : shape[1], : shape[2]]
    h = h.reshape(shape[0] // s[0], s[0], shape[1] // s[1], s[1], shape[2] // s[2], s[2]).mean((1, 3, 5))
    c = tuple((k - 1) // 2 for k in s)
    lab = labels[c[0] : shape[0] : s[0], c[1] : shape[1] : s[1], c[2] : shape[2] : s[2]]
    new = affine.copy()
    new[:3, :3] = affine[:3, :3] * np.asarray(s, float)
    new[:3, 3] = affine[:3, :3] @ np.asarray([(k - 1) / 2 for k in s]) + affine[:3, 3]
    return h.astype(np.float32), lab, new


def load_volume(
    ct_path: Path, label_path: Path, ids: dict[str, list[int]], step: tuple[int, int, int]
) -> Volume:
    """Read CT + label map, group label ids into classes, block-downsample, convert HU -> mu."""
    from medistill.physics.attenuation import hu_to_mu

    ct, lab = read_image(ct_path), read_image(label_path)
    if ct.ndim != 3:
        raise MedistillError(f"{ct_path}: expected a 3D CT volume, got shape {ct.shape}")
    check_same_grid(ct, lab, str(ct_path), str(label_path))
    raw = np.clip(np.rint(lab.array), 0, None).astype(np.int64)
    top = max(int(raw.max()), max((max(v) for v in ids.values() if v), default=0))
    counts = np.bincount(raw.ravel(), minlength=top + 1)
    lut = np.zeros(top + 1, np.uint8)
    for c, values in enumerate(ids.values()):
        lut[values] = c + 1
    missing = [name for name, values in ids.items() if not counts[values].any()]
    if missing:
        raise MedistillError(f"{label_path}: classes {missing} have no voxels; drop them from data.classes")
    hu, grouped, affine = block_downsample(ct.array.astype(np.float32), lut[raw], ct.affine, step)
    return Volume(
        hu_to_mu(torch.from_numpy(hu)), torch.from_numpy(grouped.astype(np.int64)), torch.from_numpy(affine)
    )


# -------------------------------------------------------------------------------------------- poses


def sample_poses(n: int, ranges: PoseRange, rng: np.random.Generator) -> list[dict[str, Any]]:
    """``n`` pose parameter sets (JSON-ready). The obliquity ``max(|rot|, |tilt|)`` is uniform in
    ``ranges.obliquity_deg``: one of the two angles (chosen at random) takes it, the other is uniform
    in ``+-obliquity``, so every pose lies in the range exactly."""
    out = []
    lo, hi = ranges.obliquity_deg
    for _ in range(n):
        obl = float(rng.uniform(lo, hi))
        big = obl * rng.choice([-1.0, 1.0])
        other = float(rng.uniform(-obl, obl))
        rot, tilt = (big, other) if rng.random() < 0.5 else (other, big)
        sdd = float(rng.uniform(*ranges.sdd_mm))
        out.append(
            {
                "view": str(rng.choice(ranges.views)),
                "angles_deg": [float(rot), float(tilt), float(rng.uniform(-1, 1) * ranges.roll_deg)],
                "sdd_mm": sdd,
                "sid_mm": sdd - float(rng.uniform(*ranges.air_gap_mm)),
                "shift_mm": (rng.uniform(-1, 1, 3) * ranges.shift_mm).tolist(),
                "detector_shift_px": (rng.uniform(-1, 1, 2) * ranges.detector_shift_px).tolist(),
            }
        )
    return out


def obliquity_deg(pose: dict[str, Any]) -> float:
    """``max(|LAO/RAO rotation|, |cranio-caudal tilt|)`` of a pose parameter set, degrees."""
    return float(max(abs(pose["angles_deg"][0]), abs(pose["angles_deg"][1])))


def render(volume: Volume, poses: list[dict[str, Any]], size: int, field_mm: float, progress: bool = False):
    """Line integrals ``(N H W)`` float32 (mu x mm) and masks ``(N C H W)`` uint8 of ``poses``."""
    from medistill.engine.logging import make_progress
    from medistill.physics.drr import DRRRenderer
    from medistill.physics.geometry import PRESET_MIRROR, Detector, view_pose, volume_centre_mm

    n_classes = int(volume.labels.max())
    renderer = DRRRenderer(
        volume.mu_per_mm, volume.affine, volume.labels, label_ids=list(range(1, n_classes + 1))
    )
    iso = volume_centre_mm(tuple(volume.mu_per_mm.shape), volume.affine)
    pitch = field_mm / size
    lines = np.zeros((len(poses), size, size), np.float32)
    masks = np.zeros((len(poses), n_classes, size, size), np.uint8)
    with make_progress(progress) as bar:
        task = bar.add_task("render DRRs", total=len(poses), info="")
        for i, p in enumerate(poses):
            centre = (size - 1) / 2.0
            det = Detector(
                size, size, (pitch, pitch), p["sdd_mm"],
                principal_point_px=(centre + p["detector_shift_px"][0], centre + p["detector_shift_px"][1]),
                mirror=PRESET_MIRROR[p["view"]],  # PA is seen from behind the detector: patient's right left
            )  # fmt: skip
            angles = torch.tensor([p["angles_deg"]], dtype=torch.float64) * (math.pi / 180.0)
            pose = view_pose(
                p["view"], iso, p["sid_mm"], angles, torch.tensor([p["shift_mm"]], dtype=torch.float64)
            )
            with torch.no_grad():
                out = renderer.render(det, pose)
            lines[i] = out.line_integral[0].float().numpy()
            masks[i] = out.label_mask[0].numpy()
            bar.update(task, advance=1)
    return lines, masks


# -------------------------------------------------------------------------------------------- cache


def cache_key(d: XrayData, split: str, seed: int, sources: tuple[Path, ...]) -> str:
    """Hash of everything that determines a split's renders (so a config or renderer change re-renders)."""
    fields = d.model_dump(
        mode="json", exclude={"augment", "window_percentiles", "preprocessing", "pose_seed"}
    )
    blob = json.dumps([RENDER_VERSION, fields, split, seed, [str(s) for s in sources]], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def split_poses(d: XrayData, split: str, seed: int) -> list[dict[str, Any]]:
    """The pose parameters of ``split`` (train/val from ``train_poses``, test from ``test_poses``)."""
    n = {"train": d.n_train, "val": d.n_val, "test": d.n_test}[split]
    ranges = d.test_poses if split == "test" else d.train_poses
    return sample_poses(n, ranges, np.random.default_rng([seed, ("train", "val", "test").index(split)]))


#: The last loaded render set, keyed by its files: the stages of a run (one task per pre-processing or
#: seed) share one copy in memory instead of one each (thousands of 256 x 256 DRRs are gigabytes).
_LOADED: dict[tuple[str, ...], dict[str, dict[str, np.ndarray]]] = {}


def load_or_render(
    cache_dir: Path, d: XrayData, seed: int, sources: tuple[Path, Path, Path], progress: bool = False
) -> dict[str, dict[str, np.ndarray]]:
    """``{split: {"line_integral", "masks", "poses"}}``, rendered once and cached as ``split-<hash>.npz``."""
    paths = {s: cache_dir / f"{s}-{cache_key(d, s, seed, sources)}.npz" for s in ("train", "val", "test")}
    key = tuple(str(p.resolve()) for p in paths.values())
    if key in _LOADED:
        return _LOADED[key]
    out: dict[str, dict[str, np.ndarray]] = {}
    todo = []
    for split, path in paths.items():
        if path.exists():
            with np.load(path) as z:
                out[split] = {k: z[k] for k in z.files}
        else:
            todo.append((split, path))
    if todo:
        ids = class_ids(sources[2], d.classes)
        volume = load_volume(sources[0], sources[1], ids, d.volume_step)
        for split, path in todo:
            poses = split_poses(d, split, seed)
            lines, masks = render(volume, poses, d.size, d.field_mm, progress)
            out[split] = {
                "line_integral": lines,
                "masks": masks,
                "poses": np.asarray(json.dumps(poses)),
                "classes": np.asarray(d.classes),
                "pixel_mm": np.asarray(d.field_mm / d.size),
            }
            atomic_savez(path, out[split])
    _LOADED.clear()
    _LOADED[key] = out
    return out


# ------------------------------------------------------------------------------------- image formation


def window(values: np.ndarray, percentiles: tuple[float, float] = (0.5, 99.5)) -> np.ndarray:
    """Radiograph values (higher = more attenuation) -> [0, 1] by a percentile window, float64."""
    lo, hi = np.percentile(values, percentiles)
    return np.clip((values - lo) / max(float(hi - lo), 1e-6), 0.0, 1.0)


def augment(
    line_integral: np.ndarray, rng: np.random.Generator, a: Augment, percentiles: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """A realistic radiograph in [0, 1] from a DRR's line integrals ``(H W)``, and the exposed-field mask.

    In the intensity domain ``I = exp(-L)``: scatter adds a low-frequency haze ``s * blur(I)`` (s =
    scatter-to-primary fraction), quanta are Poisson with ``N0`` photons per pixel, the detector blurs
    (Gaussian PSF). Back to ``-log I``, then the display window is jittered (percentiles), gamma /
    contrast / brightness, additive electronic noise, and with probability ``collimation_p`` collimator
    borders (uniform bright bands, as unexposed film/CR regions look after inversion).
    """
    h, w = line_integral.shape
    intensity = np.exp(-line_integral.astype(np.float64))
    s = rng.uniform(*a.scatter_fraction)
    if s > 0:
        intensity = intensity + s * ndimage.gaussian_filter(intensity, sigma=max(h, w) / 8.0)
    n0 = float(np.exp(rng.uniform(np.log(a.photons[0]), np.log(a.photons[1]))))
    intensity = np.maximum(rng.poisson(intensity * n0), 0.5) / n0
    sigma = rng.uniform(*a.blur_px)
    if sigma > 0.05:
        intensity = ndimage.gaussian_filter(intensity, sigma)
    values = -np.log(intensity)
    p = (percentiles[0] * rng.uniform(0, 2), 100 - (100 - percentiles[1]) * rng.uniform(0, 2))
    x = window(values, p) ** float(np.exp(rng.normal(0, a.gamma_log_sd)))
    x = x * rng.uniform(*a.contrast) + rng.uniform(-a.brightness, a.brightness)
    x = x + rng.normal(0, rng.uniform(*a.noise_sd), x.shape)
    field = np.ones((h, w), bool)
    if rng.random() < a.collimation_p:
        top, bottom, left, right = (int(rng.uniform(0, a.collimation_max) * n) for n in (h, h, w, w))
        field[:top], field[h - bottom :], field[:, :left], field[:, w - right :] = False, False, False, False
        x = np.where(field, x, rng.uniform(0.8, 1.0))
    return np.clip(x, 0.0, 1.0), field


class DRRSet(KeyedDataset):
    """DRRs as network inputs ``image (1 H W)`` float32 and multi-label ``masks (C H W)`` float32 in {0, 1}.

    Without augmentation the inputs are computed once (window -> CLAHE -> pre-processing); with it, per
    sample from the cached line integrals. Masks are the rendered ones, only cleared under a collimator.
    """

    def __init__(
        self,
        line_integral: np.ndarray,
        masks: np.ndarray,
        method: str,
        percentiles: tuple[float, float],
        aug: Augment | None = None,
    ) -> None:
        self.line_integral, self.masks, self.method = line_integral, masks, method
        self.percentiles, self.aug = percentiles, aug
        self._fixed = None
        if aug is None or not aug.enabled:
            self._fixed = np.stack([prepare_input(window(li, percentiles), method) for li in line_integral])

    def __len__(self) -> int:
        return len(self.line_integral)

    def get(self, index: int, rng: np.random.Generator | None) -> dict[str, torch.Tensor]:
        masks = self.masks[index]
        if self._fixed is not None or rng is None:
            image = (
                self._fixed[index]
                if self._fixed is not None
                else prepare_input(window(self.line_integral[index], self.percentiles), self.method)
            )
        else:
            raw, field = augment(self.line_integral[index], rng, self.aug, self.percentiles)
            image = prepare_input(raw, self.method)
            masks = masks * field[None]
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None],
            "masks": torch.from_numpy(np.ascontiguousarray(masks, dtype=np.float32)),
        }
