"""A synthetic multi-organ CT cohort from one labelled CT (seed C's WORD stand-in; DATA.md).

WORD (Luo et al., "WORD: A large scale dataset, benchmark and clinical applicable study for abdominal
organ segmentation from CT image", MedIA 2022) cannot be downloaded here, so we make N subjects from the
``chest-ct`` example (a TotalSegmentator label map) by a random smooth deformation, an affine jitter and
intensity/noise changes, cropped to the upper abdomen and resampled to a coarse spacing. Organs get
WORD's fixed label ids (liver 1, spleen 2, kidneys 3/4, stomach 5, ... adrenal 12) whatever the spacing.
An organ smaller than ``min_volume_ml`` (millilitres, so the threshold means the same at any spacing) in
the source crop is labelled in no subject and left out of ``dataset.json``'s labels (named in its
description instead); an organ outside one subject's crop is absent from that subject's map. Neither
shifts the ids of the others, and the label list is the same at every spacing (a model trained on a 3 mm
cohort reads a 5 mm one). Labels are sampled by nearest neighbour, never interpolated. Subjects
come from seeded generators, one per subject, so the cohort is identical for a seed on any machine.
The folder is MSD-style (``dataset.json``) plus ``splits.json`` (train/val/test case ids, split by
subject), so the same task code trains on real data in MSD layout. Every table made from it must say
"synthetic cohort from chest-ct": the subjects share one anatomy, so the numbers measure robustness to
deformation and noise, not generalisation across patients.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medistill.errors import MedistillError
from medistill.io.atomic import atomic_write_text
from medistill.io.checks import require_ct
from medistill.io.datasets import DatasetSpec, write_msd
from medistill.io.images import Image, check_same_grid, read_image

# WORD's label order (spec C.1) -> TotalSegmentator ids of chest-ct's structures.csv. Gallbladder,
# rectum, bladder and femoral heads are not in the chest-ct scan; adrenals are a few hundred voxels.
WORD_FROM_TOTALSEG: dict[str, tuple[int, ...]] = {
    "liver": (5,),
    "spleen": (1,),
    "kidney_left": (3,),
    "kidney_right": (2,),
    "stomach": (6,),
    "gallbladder": (4,),
    "esophagus": (15,),
    "pancreas": (7,),
    "duodenum": (19,),
    "colon": (20,),
    "intestine": (18,),
    "adrenal": (8, 9),
}
# the fixed label ids of every cohort: WORD's order, background 0
WORD_LABELS: dict[str, int] = {"background": 0, **{name: i + 1 for i, name in enumerate(WORD_FROM_TOTALSEG)}}
# organs whose bounding box defines the abdominal crop (the esophagus would pull it up to the neck)
CROP_ORGANS = ("liver", "spleen", "kidney_left", "kidney_right", "stomach", "pancreas")
SPLITS_FILE = "splits.json"


@dataclass(frozen=True)
class CohortSpec:
    """How to make the cohort. Lengths in mm, angles in degrees, intensities in HU."""

    n_subjects: int = 12
    seed: int = 0
    spacing_mm: tuple[float, float, float] = (3.0, 3.0, 3.0)
    margin_mm: float = 12.0
    min_volume_ml: float = 27.0  # smaller organs are left out of a label map (27 ml: 1000 voxels at 3 mm)
    split: tuple[float, float, float] = (0.6, 0.2, 0.2)
    deform_mm: float = 5.0  # std of the displacement at each control point
    deform_points: int = 5  # control points per axis of the smooth displacement
    rotate_deg: tuple[float, float, float] = (3.0, 3.0, 8.0)  # max about x, y, z (z: axial plane)
    scale: float = 0.08  # max relative isotropic scale change
    shift_mm: float = 8.0
    noise_hu: tuple[float, float] = (5.0, 25.0)
    gain: float = 0.05  # max relative change of (HU + 1000)
    offset_hu: float = 20.0

    def __post_init__(self) -> None:
        spacing = np.asarray(self.spacing_mm, dtype=float)
        if spacing.shape != (3,) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
            raise MedistillError(
                f"cohort: spacing_mm must be 3 positive lengths in mm, got {self.spacing_mm}"
            )
        if not self.min_volume_ml >= 0:
            raise MedistillError(f"cohort: min_volume_ml must be >= 0 ml, got {self.min_volume_ml}")


def _inflate(hu: torch.Tensor, affine: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """Average 2x2 in-plane voxels (anti-aliasing before coarse sampling); the affine follows."""
    pooled = F.avg_pool3d(hu[None, None], kernel_size=(2, 2, 1), ceil_mode=True)[0, 0]
    step = np.diag([2.0, 2.0, 1.0, 1.0])
    step[:3, 3] = (0.5, 0.5, 0.0)  # pooled voxel i sits between source voxels 2i and 2i + 1
    return pooled, affine @ step


def _rotation(angles_rad: Sequence[float]) -> np.ndarray:
    ax, ay, az = angles_rad
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _sample(volume: torch.Tensor, affine: np.ndarray, world_xyz: torch.Tensor, mode: str) -> torch.Tensor:
    """Sample ``volume`` (``X Y Z``, voxel -> world ``affine``) at world points ``(*S, 3)``; 0 outside."""
    inv = torch.from_numpy(np.linalg.inv(affine)).to(world_xyz)
    idx = world_xyz @ inv[:3, :3].T + inv[:3, 3]
    size = torch.tensor(volume.shape, dtype=idx.dtype)
    grid = (2 * idx / (size - 1) - 1).flip(-1)  # grid_sample wants (W, H, D) = (Z, Y, X) order
    out = F.grid_sample(
        volume[None, None].float(), grid[None].float(), mode=mode, padding_mode="zeros", align_corners=True
    )
    return out[0, 0]


class CohortMaker:
    """Makes subjects from one CT + TotalSegmentator-style label map (e.g. chest-ct)."""

    def __init__(self, ct: Image, labels: Image, spec: CohortSpec) -> None:
        check_same_grid(ct, labels, "cohort CT", "cohort label map")
        require_ct(ct, "cohort CT", override=None)
        if ct.ndim != 3:
            raise MedistillError(f"cohort: expected a 3D CT, got shape {ct.shape}")
        self.spec = spec
        src = np.asarray(labels.array)
        if not np.issubdtype(src.dtype, np.integer):
            src = np.rint(src).astype(np.int64)
        if src.min() < 0:
            raise MedistillError("cohort: the label map holds negative values")
        # reference crop in source voxels: bounding box of the main organs + margin
        crop_ids = [i for name in CROP_ORGANS for i in WORD_FROM_TOTALSEG[name]]
        in_crop = np.zeros(int(src.max()) + 1, dtype=bool)
        in_crop[[i for i in crop_ids if i < len(in_crop)]] = True
        organ = in_crop[src]
        if not organ.any():
            raise MedistillError(f"cohort: none of the organs {CROP_ORGANS} is in the label map")
        extent = [np.flatnonzero(organ.any(axis=tuple(a for a in range(3) if a != k))) for k in range(3)]
        spacing = np.asarray(ct.spacing)
        margin = np.ceil(spec.margin_mm / spacing).astype(int)
        lo = np.maximum(np.array([e[0] for e in extent]) - margin, 0)
        hi = np.minimum(np.array([e[-1] for e in extent]) + margin + 1, src.shape)
        # output grid: the crop's field of view at the target spacing, same axis directions as the CT
        out_spacing = np.asarray(spec.spacing_mm, dtype=float)
        self.shape = tuple(int(s) for s in np.floor((hi - lo) * spacing / out_spacing))
        direction = ct.direction
        self.affine = np.eye(4)
        self.affine[:3, :3] = direction * out_spacing
        start = ct.affine @ np.array([*(lo - 0.5), 1.0])  # corner of the crop
        self.affine[:3, 3] = start[:3] + direction @ (out_spacing / 2)
        # relabel to the fixed WORD ids (a lookup table); organs too small in the crop map to background
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        counts = np.bincount(src[box].ravel(), minlength=len(in_crop))
        lut = np.zeros(len(in_crop), dtype=np.uint8)
        self.volume_ml: dict[str, float] = {}  # in the source crop
        for name, ids in WORD_FROM_TOTALSEG.items():
            present = [i for i in ids if i < len(counts)]
            self.volume_ml[name] = float(counts[present].sum() * np.prod(spacing) / 1000.0)
            if self.volume_ml[name] >= spec.min_volume_ml:
                lut[present] = WORD_LABELS[name]
        self.absent = {k: v for k, v in self.volume_ml.items() if v < spec.min_volume_ml}
        # the organs the cohort labels, at their WORD ids (the same set at every spacing: it is judged in
        # ml on the source); never-labelled organs are left out so a net is not trained on empty classes
        self.labels = {k: v for k, v in WORD_LABELS.items() if k not in self.absent}
        # source tensors restricted to the crop + a band for the jitter to pull from
        band = np.ceil((spec.shift_mm + 4 * spec.deform_mm + 40.0) / spacing).astype(int)
        s_lo, s_hi = np.maximum(lo - band, 0), np.minimum(hi + band, src.shape)
        sub = tuple(slice(a, b) for a, b in zip(s_lo, s_hi, strict=True))
        shift = np.eye(4)
        shift[:3, 3] = s_lo
        self.src_affine = ct.affine @ shift
        hu = torch.from_numpy(np.asarray(ct.array, dtype=np.float32)[sub].copy())
        self.hu, self.hu_affine = _inflate(hu + 1024.0, self.src_affine)  # +1024: zero padding is air
        self.word = torch.from_numpy(lut[src[sub]])
        grid = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in self.shape], indexing="ij"), -1)
        self.world = torch.from_numpy(grid @ self.affine[:3, :3].T + self.affine[:3, 3])  # (*S, 3) mm
        self.centre = self.world.reshape(-1, 3).mean(0)

    def subject(self, index: int) -> tuple[Image, Image]:
        """Subject ``index``: (CT in HU as int16-valued float32, label map uint8 with the WORD ids).

        The size threshold is applied once, to the source: an organ kept there is labelled in every
        subject where it lies in the crop, however much the jitter's zoom shrinks it (the CT still shows
        it, and labelling it background would teach a net to miss it). An organ the jitter moves out of
        the crop is absent from that subject's map; the other organs keep their ids.
        """
        s = self.spec
        rng = np.random.default_rng([s.seed, index])
        rot = _rotation(np.deg2rad(rng.uniform(-1, 1, 3) * np.asarray(s.rotate_deg)))
        zoom = 1.0 + rng.uniform(-s.scale, s.scale)
        shift = rng.uniform(-s.shift_mm, s.shift_mm, 3)
        coarse = rng.normal(0.0, s.deform_mm, (1, 3, *(s.deform_points,) * 3))
        disp = F.interpolate(torch.from_numpy(coarse), size=self.shape, mode="trilinear", align_corners=True)[
            0
        ].permute(1, 2, 3, 0)  # (*S, 3) mm, smooth
        matrix = torch.from_numpy(rot * zoom)
        pts = (self.world - self.centre) @ matrix.T + self.centre + torch.from_numpy(shift) + disp
        hu = _sample(self.hu, self.hu_affine, pts, "bilinear").numpy() - 1024.0
        lab = _sample(self.word, self.src_affine, pts, "nearest").numpy().round().astype(np.uint8)
        gain = 1.0 + rng.uniform(-s.gain, s.gain)
        hu = (hu + 1000.0) * gain - 1000.0 + rng.uniform(-s.offset_hu, s.offset_hu)
        hu = hu + rng.normal(0.0, rng.uniform(*s.noise_hu), hu.shape)
        hu = np.clip(np.rint(hu), -1024, 3071).astype(np.float32)
        return Image(hu, self.affine.copy()), Image(lab, self.affine.copy())

    def subjects(self) -> Iterator[tuple[str, Image, Image]]:
        for i in range(self.spec.n_subjects):
            ct, lab = self.subject(i)
            yield f"subject_{i:03d}", ct, lab


def split_ids(ids: Sequence[str], fractions: Sequence[float], seed: int) -> dict[str, list[str]]:
    """Seeded split of subject ids into train/val/test (each non-empty when there are >= 3 ids)."""
    if len(ids) < 3:
        raise MedistillError(f"a train/val/test split needs at least 3 subjects, got {len(ids)}")
    order = [ids[i] for i in np.random.default_rng([seed, 7919]).permutation(len(ids))]
    f = np.asarray(fractions, dtype=float) / float(np.sum(fractions))
    n_val = max(1, int(round(f[1] * len(ids))))
    n_test = max(1, int(round(f[2] * len(ids))))
    n_train = len(ids) - n_val - n_test
    if n_train < 1:
        raise MedistillError(f"split {tuple(fractions)} leaves no training subject out of {len(ids)}")
    return {
        "train": sorted(order[:n_train]),
        "val": sorted(order[n_train : n_train + n_val]),
        "test": sorted(order[n_train + n_val :]),
    }


def make_cohort(
    out: str | Path, spec: CohortSpec, ct: Image | None = None, labels: Image | None = None
) -> DatasetSpec:
    """Write the cohort to ``out`` (MSD layout + ``splits.json``); the source defaults to chest-ct."""
    if ct is None or labels is None:
        from medistill.io.examples import example_file

        ct = read_image(example_file("chest-ct", "cxr.nii.gz"))
        labels = read_image(example_file("chest-ct", "mask.nii.gz"))
    maker = CohortMaker(ct, labels, spec)
    if spec.n_subjects < 3:
        raise MedistillError(f"a cohort needs at least 3 subjects (train/val/test), got {spec.n_subjects}")
    absent = ", ".join(f"{k} ({v:.1f} ml)" for k, v in maker.absent.items()) or "none"
    description = (
        f"synthetic cohort from chest-ct: {spec.n_subjects} subjects (seed {spec.seed}) by smooth "
        f"deformation, affine jitter and intensity/noise changes, {maker.shape} voxels at "
        f"{tuple(spec.spacing_mm)} mm; fixed WORD label ids; organs absent from every subject "
        f"(< {spec.min_volume_ml:g} ml in the source): {absent}"
    )
    root = Path(out)
    dataset = write_msd(
        root,
        ((cid, ct_i, lab_i) for cid, ct_i, lab_i in maker.subjects()),
        maker.labels,
        name="chest-ct-cohort",
        description=description,
        overwrite=True,
    )
    splits = split_ids([c.id for c in dataset.cases], spec.split, spec.seed)
    atomic_write_text(root / SPLITS_FILE, json.dumps(splits, indent=2) + "\n")
    return dataset


def read_splits(root: str | Path) -> dict[str, list[str]] | None:
    """``splits.json`` of a dataset folder (train/val/test case ids), or None when absent."""
    path = Path(root) / SPLITS_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("train", "val", "test")):
        raise MedistillError(f"{path}: expected {{'train': [...], 'val': [...], 'test': [...]}}")
    return {k: [str(c) for c in data[k]] for k in ("train", "val", "test")}


def phantom_abdomen(shape: tuple[int, int, int] = (80, 80, 48), seed: int = 0) -> tuple[Image, Image]:
    """A small analytic upper abdomen (HU image, TotalSegmentator-id labels) in LAS at 2 x 2 x 4 mm.

    Ellipsoids for liver (5), spleen (1), kidneys (2 right, 3 left), stomach (6) and pancreas (7) inside
    a water body with noise: a stand-in source for :class:`CohortMaker` in tests (milliseconds to make).
    """
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    x, y, z = grid  # array axis 0 runs towards the patient's left (LAS), 1 anterior, 2 superior

    def ellipsoid(cx: float, cy: float, cz: float, rx: float, ry: float, rz: float) -> np.ndarray:
        return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 + ((z - cz) / rz) ** 2 < 1

    hu = np.full(shape, -1000.0)
    hu[(x / 0.9) ** 2 + (y / 0.75) ** 2 < 1] = 30.0
    labels = np.zeros(shape, np.uint8)
    organs = (
        (5, 110.0, (-0.4, 0.1, 0.2, 0.4, 0.45, 0.6)),  # liver on the patient's right (low axis-0 index)
        (1, 90.0, (0.5, -0.1, 0.3, 0.2, 0.25, 0.3)),  # spleen
        (2, 150.0, (-0.35, -0.5, -0.4, 0.15, 0.15, 0.35)),  # right kidney
        (3, 150.0, (0.35, -0.5, -0.35, 0.15, 0.15, 0.35)),  # left kidney
        (6, -20.0, (0.25, 0.35, 0.3, 0.25, 0.2, 0.3)),  # stomach
        (7, 70.0, (0.05, -0.1, -0.1, 0.3, 0.08, 0.12)),  # pancreas
    )
    for value, organ_hu, box in organs:
        mask = ellipsoid(*box)
        labels[mask] = value
        hu[mask] = organ_hu
    hu += rng.normal(0.0, 10.0, shape)
    affine = np.diag([-2.0, 2.0, 4.0, 1.0])
    affine[:3, 3] = (80.0, -80.0, -100.0)
    return Image(hu.astype(np.float32), affine), Image(labels, affine.copy())
