"""Data of unpaired MR -> CT synthesis: axial slices of two people's heads, their masks, the registered
evaluation reference and the split.

* **Slices** come from each volume's affine (:func:`medistill.io.axial.axial_slices`: rows anterior ->
  posterior, columns right -> left), are resampled to one physical pixel size (``fov_mm / size``) and
  centred on a ``size x size`` canvas (:func:`to_canvas`; :func:`from_canvas` is its inverse), as float32,
  never 8-bit (the original's PNGs quantised CT to 9.4 HU per level, spec E.8.7).
* **CT** is clipped to ``hu_window`` and scaled linearly to [-1, 1] (:func:`ct_to_unit`).
* **MR** has no units, so it is scaled by a robust, field-of-view independent statistic: the
  ``mr_percentile``-th percentile of the voxels *inside the head mask* maps to 1, zero to -1, clipped
  (:func:`mr_to_unit`). A percentile of the whole volume would move with the amount of background.
* **Masks** (documented thresholds, no learned extractor): MR head = Otsu threshold, largest connected
  component, holes filled slice by slice (the dark skull between scalp and brain is enclosed); CT body =
  HU > -500, the same clean-up; CT bone = HU > 300.
* **Reference**: the CT registered once to the MR (SimpleITK: affine by Mattes mutual information, then
  a B-spline, :func:`register_ct_to_mr`), resampled on the MR grid with its coverage mask and stored with
  the transform in ``RUN/reference/``. It is **another person registered**, not the same patient.
* **Split**: one MR volume, so by slabs of consecutive axial MR slices (train / val / test, one-slice
  gaps). CT slices that the registration maps onto a val or test MR slab are left out of CT training, so
  the generator never sees the CT anatomy of a test level; by default CT training also keeps only the
  levels the MR training slabs cover (``ct_levels: mr_train``): the CT reaches the mandible and teeth,
  the MR's usable slices do not, and without this the CT discriminator asks every brain slice for the
  bone of the skull base. The registration is used only to pick levels, never as paired supervision.
* **Pairs** (``data.pair``): ``head`` (head-mr and head-ct, or the files ``data.mr`` / ``data.ct``) or
  ``brain`` (brain-mr and brain-ct, both brain only, prepared once by :mod:`.synthesis_brain`: the brain
  CT's 0 HU background becomes air, so every check and mask here applies unchanged).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from scipy import ndimage
from skimage.filters import threshold_otsu

from medistill.config import StrictModel
from medistill.engine.data import KeyedDataset
from medistill.errors import MedistillError
from medistill.io.atomic import atomic_write_text
from medistill.io.axial import AxialSlices, axial_axis
from medistill.io.images import Image, _from_sitk, _to_sitk, read_image, write_image

SPLITS = ("train", "train", "val", "train", "test")  # slab pattern along the MR's z
BODY_HU, BONE_HU = -500.0, 300.0


class RegistrationConfig(StrictModel):
    """CT -> MR registration for the evaluation reference (computed once per run)."""

    spacing_mm: float = Field(3.0, gt=0, description="both volumes are registered at this isotropic spacing")
    affine_iterations: int = Field(200, ge=1)
    bspline: bool = Field(True, description="refine the affine by a B-spline")
    bspline_mesh: int = Field(6, ge=1, description="B-spline control mesh size per axis")
    bspline_iterations: int = Field(30, ge=1)


class SynthesisData(StrictModel):
    pair: Literal["head", "brain"] = Field(
        "head",
        description="head: head-mr (Colin27 with skull) and head-ct (or data.mr / data.ct); brain: the "
        "brain-only pair brain-mr (MNI152) and brain-ct (atlas, air set outside its brain), prepared once",
    )
    mr_example: str | None = Field("head-mr", description="example set of the MR (its ch2.nii.gz)")
    ct_example: str | None = Field("head-ct", description="example set of the CT (its head_ct.nii.gz)")
    mr: Path | None = Field(None, description="MR volume (used instead of mr_example)")
    ct: Path | None = Field(None, description="CT volume in HU (used instead of ct_example)")
    size: int = Field(128, ge=16, description="canvas size (pixels); a multiple of the generator's divisor")
    fov_mm: float = Field(256.0, gt=0, description="canvas field of view (mm): pixel = fov_mm / size")
    hu_window: tuple[float, float] = Field((-1000.0, 2000.0), description="CT HU window -> [-1, 1]")
    mr_percentile: float = Field(99.5, gt=50, le=100, description="MR percentile in the head mask -> 1")
    slab: int = Field(10, ge=2, description="MR slices per slab of the slab split")
    min_head_fraction: float = Field(
        0.15,
        ge=0,
        lt=1,
        description="slices whose head area is below this fraction of the largest are unused",
    )
    ct_levels: Literal["mr_train", "all"] = Field(
        "mr_train",
        description="CT training slices: those the registration maps onto MR training slabs, or all (both "
        "minus the levels of held-out MR slabs)",
    )
    flip_lr: bool = Field(True, description="random left-right flips in training (heads are near symmetric)")
    registration: RegistrationConfig = RegistrationConfig()
    reference_cache: bool = Field(
        True, description="reuse a registration cached for the same files + settings"
    )

    @model_validator(mode="after")
    def _pair_sources(self) -> SynthesisData:
        """The brain pair prepares its own two files: an MR or CT named beside it would be ignored. Only
        values other than the defaults count (a saved run config spells every default out)."""
        fields = type(self).model_fields
        named = [k for k in ("mr", "ct", "mr_example", "ct_example") if getattr(self, k) != fields[k].default]
        if self.pair == "brain" and named:
            raise ValueError(
                "pair 'brain' uses the brain-mr and brain-ct example sets; remove "
                + ", ".join(f"data.{k}" for k in named)
            )
        return self


# ------------------------------------------------------------------------------------ intensities and masks


def ct_to_unit(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    lo, hi = window
    return ((np.clip(hu, lo, hi) - lo) / (hi - lo) * 2 - 1).astype(np.float32)


def unit_to_hu(x: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    lo, hi = window
    return ((np.asarray(x, np.float32) + 1) * 0.5 * (hi - lo) + lo).astype(np.float32)


def mr_scale(mr: np.ndarray, head: np.ndarray, percentile: float) -> float:
    """The MR value that maps to 1: the ``percentile``-th percentile inside the head mask."""
    if not head.any():
        raise MedistillError("MR head mask is empty: nothing above the Otsu threshold")
    scale = float(np.percentile(mr[head], percentile))
    if scale <= 0:
        raise MedistillError(f"MR {percentile}th percentile inside the head is {scale}; expected > 0")
    return scale


def mr_to_unit(mr: np.ndarray, scale: float) -> np.ndarray:
    return (np.clip(mr / scale, 0, 1) * 2 - 1).astype(np.float32)


def _largest_filled(mask: np.ndarray, slice_axis: int = 0) -> np.ndarray:
    """Largest 3D connected component, holes filled in 3D and in every slice along ``slice_axis``."""
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask.astype(bool)
    sizes = ndimage.sum(mask, labels, range(1, n + 1))
    out = ndimage.binary_fill_holes(labels == 1 + int(np.argmax(sizes)))
    out = np.moveaxis(out, slice_axis, 0)
    out = np.stack([ndimage.binary_fill_holes(s) for s in out])
    return np.moveaxis(out, 0, slice_axis)


def mr_head_mask(mr: np.ndarray, slice_axis: int = 0) -> np.ndarray:
    """Head mask of an MR volume: Otsu threshold, largest component, holes filled (3D and per slice)."""
    if float(mr.max()) <= float(mr.min()):
        raise MedistillError("the MR volume is constant; there is no head to find")
    return _largest_filled(mr > threshold_otsu(mr), slice_axis)


def ct_body_mask(hu: np.ndarray, slice_axis: int = 0) -> np.ndarray:
    """Body mask of a CT: HU > -500, largest component (drops the head rest if it is apart), filled."""
    return _largest_filled(hu > BODY_HU, slice_axis)


# ------------------------------------------------------------------------------------ canvas geometry


class Canvas(NamedTuple):
    """How native slices ``(H, W)`` at ``spacing_mm`` sit on the ``size x size`` canvas."""

    native: tuple[int, int]
    resized: tuple[int, int]
    size: int

    def offsets(self) -> tuple[int, int]:
        """Top-left of the resized slice on the canvas (negative: the slice is cropped)."""
        return ((self.size - self.resized[0]) // 2, (self.size - self.resized[1]) // 2)


def canvas_of(native: tuple[int, int], spacing_mm: tuple[float, float], pixel_mm: float, size: int) -> Canvas:
    resized = tuple(max(1, round(n * s / pixel_mm)) for n, s in zip(native, spacing_mm, strict=True))
    return Canvas((int(native[0]), int(native[1])), resized, size)  # type: ignore[arg-type]


def _resize(x: np.ndarray | torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    t = torch.as_tensor(np.ascontiguousarray(x) if isinstance(x, np.ndarray) else x, dtype=torch.float32)
    if tuple(t.shape[-2:]) == tuple(shape):
        return t
    return F.interpolate(t[:, None], size=shape, mode="bilinear", antialias=True, align_corners=False)[:, 0]


def _place(src: torch.Tensor, dst: torch.Tensor, top: int, left: int) -> None:
    """Copy ``src`` (``N h w``) into ``dst`` (``N H W``) at (top, left), cropping what falls outside."""
    h, w = src.shape[-2:]
    H, W = dst.shape[-2:]
    r0, c0 = max(0, top), max(0, left)
    r1, c1 = min(H, top + h), min(W, left + w)
    dst[:, r0:r1, c0:c1] = src[:, r0 - top : r1 - top, c0 - left : c1 - left]


def to_canvas(slices: np.ndarray, canvas: Canvas, fill: float) -> np.ndarray:
    """``N H W`` native slices -> ``N size size``: resampled (bilinear, anti-aliased) and centred."""
    out = torch.full((len(slices), canvas.size, canvas.size), float(fill))
    _place(_resize(slices, canvas.resized), out, *canvas.offsets())
    return out.numpy()


def from_canvas(images: np.ndarray | torch.Tensor, canvas: Canvas, fill: float) -> np.ndarray:
    """Inverse of :func:`to_canvas`: ``N size size`` -> ``N H W`` (parts cropped away get ``fill``)."""
    t = torch.as_tensor(images, dtype=torch.float32)
    crop = torch.full((len(t), *canvas.resized), float(fill))
    top, left = canvas.offsets()
    _place(t, crop, -top, -left)
    return _resize(crop, canvas.native).numpy()


# ------------------------------------------------------------------------------------ registration


def _resample_iso(img: sitk.Image, spacing: float) -> sitk.Image:
    size = [max(4, round(n * s / spacing)) for n, s in zip(img.GetSize(), img.GetSpacing(), strict=True)]
    return sitk.Resample(
        sitk.SmoothingRecursiveGaussian(img, spacing / 2),
        size,
        sitk.Transform(),
        sitk.sitkLinear,
        img.GetOrigin(),
        [spacing] * 3,
        img.GetDirection(),
        0.0,
        img.GetPixelID(),
    )


#: Seed of the metric's random sample (any value but 0, which SimpleITK reads as "seed from the clock").
SAMPLING_SEED = 20261201


def _mi_method(iterations: int, fixed_mask: sitk.Image) -> sitk.ImageRegistrationMethod:
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    # a fixed seed: SimpleITK's seed 0 is sitkWallClock, a new sample (and another optimum) every run
    reg.SetMetricSamplingPercentage(0.1, seed=SAMPLING_SEED)
    reg.SetMetricFixedMask(fixed_mask)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetShrinkFactorsPerLevel([2, 1])
    reg.SetSmoothingSigmasPerLevel([1, 0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    return reg


class Reference(NamedTuple):
    """The CT registered onto the MR grid: HU, where the CT covers the MR grid, and the transform."""

    hu: Image
    valid: np.ndarray
    transform: sitk.Transform
    info: dict[str, Any]


def register_ct_to_mr(mr: Image, ct: Image, cfg: RegistrationConfig) -> Reference:
    """Register ``ct`` (moving, HU) to ``mr`` (fixed) by Mattes MI: an affine initialised by the head masks'
    centres of mass, then (``cfg.bspline``) a B-spline on top; both at ``cfg.spacing_mm``. The CT is
    resampled on the MR grid (linear, -1000 HU outside its field)."""
    start = time.perf_counter()
    fixed_full, moving_full = _to_sitk(mr, Path("mr")), _to_sitk(ct, Path("ct"))
    fixed_full, moving_full = (
        sitk.Cast(fixed_full, sitk.sitkFloat32),
        sitk.Cast(moving_full, sitk.sitkFloat32),
    )
    fixed, moving = _resample_iso(fixed_full, cfg.spacing_mm), _resample_iso(moving_full, cfg.spacing_mm)
    f_arr = sitk.GetArrayFromImage(fixed)
    fmask = sitk.GetImageFromArray(mr_head_mask(f_arr).astype(np.uint8))
    fmask.CopyInformation(fixed)
    mmask = sitk.GetImageFromArray(ct_body_mask(sitk.GetArrayFromImage(moving)).astype(np.uint8))
    mmask.CopyInformation(moving)
    init = sitk.CenteredTransformInitializer(
        fmask, mmask, sitk.AffineTransform(3), sitk.CenteredTransformInitializerFilter.MOMENTS
    )
    reg = _mi_method(cfg.affine_iterations, fmask)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0, minStep=1e-3, numberOfIterations=cfg.affine_iterations, relaxationFactor=0.7
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetInitialTransform(init, inPlace=True)
    reg.Execute(fixed, moving)
    affine = init
    info: dict[str, Any] = {
        "affine_mi": reg.GetMetricValue(),
        "affine_iterations": reg.GetOptimizerIteration(),
    }
    transform: sitk.Transform = affine
    if cfg.bspline:
        bsp = sitk.BSplineTransformInitializer(fixed, [cfg.bspline_mesh] * 3)
        reg = _mi_method(cfg.bspline_iterations, fmask)
        reg.SetOptimizerAsLBFGSB(numberOfIterations=cfg.bspline_iterations, maximumNumberOfCorrections=5)
        reg.SetMovingInitialTransform(affine)
        reg.SetInitialTransform(bsp, inPlace=True)
        reg.Execute(fixed, moving)
        info |= {"bspline_mi": reg.GetMetricValue(), "bspline_iterations": reg.GetOptimizerIteration()}
        transform = sitk.CompositeTransform([affine, bsp])  # applied last to first: B-spline, then affine
        transform.FlattenTransform()
    warped = sitk.Resample(moving_full, fixed_full, transform, sitk.sitkLinear, -1000.0, sitk.sitkFloat32)
    cover = sitk.Resample(
        sitk.Cast(moving_full * 0 + 1, sitk.sitkUInt8), fixed_full, transform, sitk.sitkNearestNeighbor, 0
    )
    hu = _from_sitk(warped, Path("reference"))
    valid = _from_sitk(cover, Path("coverage")).array.astype(bool)
    axis = axial_axis(mr.affine)
    mr_head = mr_head_mask(mr.array, axis)
    body = ct_body_mask(hu.array, axis) & valid
    both = mr_head & valid
    dice = 2 * (body & both).sum() / max(1, body.sum() + both.sum())
    info |= {
        "seconds": round(time.perf_counter() - start, 1),
        "head_dice_mr_vs_registered_ct": float(dice),
        "settings": cfg.model_dump(),
    }
    return Reference(Image(hu.array, mr.affine), valid, transform, info)


def save_reference(ref: Reference, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_image(ref.hu, folder / "reference_ct.nii.gz", dtype=np.float32)
    write_image(Image(ref.valid, ref.hu.affine), folder / "coverage.nii.gz", dtype=np.uint8)
    sitk.WriteTransform(ref.transform, str(folder / "ct_to_mr.h5"))
    atomic_write_text(folder / "registration.json", json.dumps(ref.info, indent=2) + "\n")


def reference_key(mr_path: Path, ct_path: Path, cfg: RegistrationConfig) -> str:
    """Cache key of a registration: the two files' contents and the settings."""
    h = hashlib.sha256(json.dumps(cfg.model_dump(), sort_keys=True).encode())
    for path in (mr_path, ct_path):
        h.update(hashlib.sha256(Path(path).read_bytes()).digest())
    return h.hexdigest()[:20]


def load_reference(folder: Path, cfg: RegistrationConfig) -> Reference | None:
    """The stored reference if complete and made with the same settings, else None."""
    files = ("reference_ct.nii.gz", "coverage.nii.gz", "ct_to_mr.h5", "registration.json")
    if not all((folder / f).is_file() for f in files):
        return None
    info = json.loads((folder / "registration.json").read_text())
    if info.get("settings") != cfg.model_dump():
        return None
    hu = read_image(folder / "reference_ct.nii.gz")
    valid = read_image(folder / "coverage.nii.gz").array.astype(bool)
    return Reference(hu, valid, sitk.ReadTransform(str(folder / "ct_to_mr.h5")), info)


def ct_levels_of_mr_slices(
    mr: Image,
    ct: Image,
    transform: sitk.Transform,
    mr_ax: AxialSlices,
    ct_ax: AxialSlices,
    mr_slices: np.ndarray,
    mr_head: np.ndarray,
) -> set[int]:
    """Canonical CT slice indices at the level of the given MR slices: where the transform maps each MR
    slice's head centroid (``mr_head``: canonical ``S H W`` mask), the two nearest CT slices. The centroid,
    not the whole plane: the two heads are tilted against each other, so one MR plane crosses tens of CT
    slices at its rim."""
    fixed = _to_sitk(Image(np.zeros((2, 2, 2), np.float32), mr.affine), Path("mr"))
    moving = _to_sitk(Image(np.zeros((2, 2, 2), np.float32), ct.affine), Path("ct"))
    inv_mr, inv_ct = np.linalg.inv(mr.affine), np.linalg.inv(ct_ax.affine)
    n_ct = ct_ax.slices.shape[0]
    out: set[int] = set()
    for s in mr_slices:
        rr, cc = np.nonzero(mr_head[s])
        if not len(rr):
            continue
        world = mr_ax.affine @ np.array([s, rr.mean(), cc.mean(), 1.0])  # canonical (s, r, c) -> RAS
        p = fixed.TransformContinuousIndexToPhysicalPoint([float(v) for v in (inv_mr @ world)[:3]])
        q = moving.TransformPhysicalPointToContinuousIndex(transform.TransformPoint(p))
        k = (inv_ct @ (ct.affine @ np.array([*q, 1.0])))[0]
        if -0.5 <= k <= n_ct - 0.5:
            out.update({int(np.floor(k)), int(np.ceil(k))} & set(range(n_ct)))
    return out


def slab_split(usable: np.ndarray, slab: int) -> dict[str, np.ndarray]:
    """Train/val/test indices among the ``usable`` slice indices: slabs of ``slab`` consecutive slices in
    the pattern :data:`SPLITS`, the first slice of every later slab dropped as a gap."""
    out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for i, z in enumerate(usable):
        s, pos = divmod(i, slab)
        if pos == 0 and s > 0:
            continue
        out[SPLITS[s % len(SPLITS)]].append(int(z))
    return {k: np.asarray(v, dtype=int) for k, v in out.items()}


# ------------------------------------------------------------------------------------ datasets


class UnpairedSlices(KeyedDataset):
    """Unpaired training samples: MR slice ``i`` (``1 S S`` in [-1, 1]) with its head mask, and a CT slice
    drawn uniformly at random (CycleGAN's unaligned sampling); an epoch is ``max(#MR, #CT)``."""

    def __init__(self, mr: np.ndarray, mr_mask: np.ndarray, ct: np.ndarray, flip_lr: bool) -> None:
        if not len(mr) or not len(ct):
            raise MedistillError(
                f"unpaired training needs MR and CT slices, got {len(mr)} MR and {len(ct)} CT"
            )
        self.mr, self.mr_mask, self.ct, self.flip_lr = mr, mr_mask, ct, flip_lr

    def __len__(self) -> int:
        return max(len(self.mr), len(self.ct))

    def get(self, index: int, rng: np.random.Generator | None) -> dict[str, torch.Tensor]:
        i = index % len(self.mr)
        j = int(rng.integers(len(self.ct))) if rng is not None else index % len(self.ct)
        x, m, y = self.mr[i], self.mr_mask[i], self.ct[j]
        if rng is not None and self.flip_lr:
            if rng.random() < 0.5:
                x, m = x[:, ::-1], m[:, ::-1]
            if rng.random() < 0.5:
                y = y[:, ::-1]

        def t(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None]

        return {"mr": t(x), "mr_mask": t(m), "ct": t(y)}


class ReferenceSlices(KeyedDataset):
    """Held-out MR slices with the registered reference CT and the evaluation mask (head & covered)."""

    def __init__(self, mr: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> None:
        self.mr, self.ref, self.mask = mr, ref, mask

    def __len__(self) -> int:
        return len(self.mr)

    def get(self, index: int, rng: np.random.Generator | None) -> dict[str, torch.Tensor]:
        return {
            "mr": torch.from_numpy(self.mr[index])[None],
            "ct": torch.from_numpy(self.ref[index])[None],
            "mask": torch.from_numpy(self.mask[index].astype(np.float32))[None],
        }
