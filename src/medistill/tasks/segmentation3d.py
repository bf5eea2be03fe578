"""3D multi-organ CT segmentation: a heavy teacher distilled into LCOV-Net with CAKD + MSKD (system C).

Zhao et al., "MSKD: Structured knowledge distillation for efficient medical image segmentation", IEEE TMI
2023 (LCOV-Net student, class-affinity KD and multi-scale KD; code HiLab-git/LCOVNet-and-KD, spec C).
One run trains three stages with the same engine: ``teacher`` (nnU-Net-like 3D U-Net) ->
``student_kd`` (LCOV-Net, Dice+CE with deep supervision + CAKD + MSKD from the frozen best teacher) ->
``student_nokd`` (the same student and schedule without KD: the ablation).

Deviations from the released code (spec C.2, C.7, C.9), each to fix a bug or follow nnU-Net practice:
orientation to RAS and resampling to a fixed spacing (not a fixed voxel grid); HU clipping and a z-score
computed on the *whole* resampled volume (the original normalised after cropping, so training and test
statistics differed); foreground-oversampled patches; flips along the left-right axis swap left/right
organ labels (the original flipped without swapping); Dice+CE with nearest-down-sampled deep supervision
targets; sliding-window inference with 50 % overlap and Gaussian weighting (MONAI), probabilities
resampled back to the input grid; no ``LabelConvert`` (it erased every organ). Per-organ Dice and HD95
(MONAI, in mm) are computed on each test subject's original grid.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
import yaml
from monai.inferers import sliding_window_inference
from pydantic import Field
from torch.utils.data import Dataset

from medistill.config import ExperimentConfig, ModelSpec, StrictModel
from medistill.engine.data import KeyedDataset
from medistill.errors import MedistillError
from medistill.io.atomic import atomic_write_text
from medistill.io.checks import read_ct
from medistill.io.images import Image, read_image, write_image
from medistill.metrics.segmentation import dice, score_structures, summary_markdown
from medistill.metrics.segmentation import summarise as summarise_scores
from medistill.registry import NETS, TASKS
from medistill.tasks.base import Task, require_divisible
from medistill.tasks.cohort import CohortSpec, make_cohort, read_splits
from medistill.tasks.steps import supervised_step

RAS_ORNT = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)
NORM_FILE = "normalisation.json"  # in RUN/<stage>/


# --------------------------------------------------------------------------------------------- config


class CohortOptions(StrictModel):
    """A synthetic cohort from chest-ct, written to ``RUN/cohort`` when ``data.dataset`` is not set."""

    n_subjects: int = Field(12, ge=3)
    seed: int = 0
    spacing_mm: float = Field(3.0, gt=0)
    min_volume_ml: float = Field(27.0, ge=0, description="organs smaller than this (ml) are left out")


class Seg3DData(StrictModel):
    dataset: Path | None = Field(None, description="MSD dataset.json or nnU-Net raw folder (real data)")
    cohort: CohortOptions = CohortOptions()
    split: tuple[float, float, float] = Field(
        (0.6, 0.2, 0.2), description="train/val/test fractions when the dataset has no splits.json"
    )
    spacing_mm: tuple[float, float, float] = Field((3.0, 3.0, 3.0), description="working spacing (RAS)")
    normalisation: Literal["ct_fixed", "volume_zscore"] = Field(
        "ct_fixed",
        description="ct_fixed: clip to the 0.5/99.5 percentiles of the training set's foreground voxels, "
        "z-score with their mean/SD (nnU-Net; stored with the model); volume_zscore: clip to hu_window, "
        "z-score with the input volume's own mean/SD (depends on the field of view; earlier models)",
    )
    hu_window: tuple[float, float] = Field(
        (-160.0, 240.0), description="HU clip of volume_zscore; the display window of the figures"
    )
    patch: tuple[int, int, int] = Field((64, 64, 48), description="training patch / sliding window")
    fg_fraction: float = Field(0.33, ge=0, le=1, description="patches centred on a foreground voxel")
    beyond_edge: float = Field(
        0.5,
        ge=0,
        le=0.5,
        description="how far (fraction of the patch per axis) a training patch may reach past the volume's "
        "edge, the outside filled with air and background: the net learns where a field of view ends, so "
        "a scan with more or less around the organs than the training crops is read alike",
    )
    flip_lr: float = Field(0.5, ge=0, le=1, description="left-right flip probability (swaps L/R labels)")
    rotate_deg: float = Field(10.0, ge=0, description="max rotation in the axial plane")
    scale: float = Field(0.1, ge=0, lt=1, description="max relative zoom")
    intensity: float = Field(0.1, ge=0, description="max relative scale/shift of normalised intensity")
    noise: float = Field(0.05, ge=0, description="max std of added Gaussian noise (normalised units)")
    sw_overlap: float = Field(0.5, ge=0, lt=1)
    sw_batch: int = Field(2, ge=1)


class Seg3DConfig(ExperimentConfig):
    """A seg3d experiment: the data section, and the ``stages`` (teacher, KD student, ablation) that train
    networks registered in :data:`~medistill.registry.NETS` (the task supplies ``spatial_dims``,
    ``in_channels``, ``out_channels`` and ``deep_supervision``)."""

    task: str = "seg3d"
    data: Seg3DData = Seg3DData()


# ------------------------------------------------------------------------------------- normalisation

#: the schemes of ``data.normalisation`` (see :class:`Normalisation`)
SCHEMES = ("ct_fixed", "volume_zscore")


@dataclass(frozen=True)
class Normalisation:
    """How HU become network input; stored with every trained stage (``RUN/<stage>/normalisation.json``,
    the stage's ``last.pt``) and in the exported ONNX model's metadata.

    * ``ct_fixed`` (nnU-Net's CT scheme, Isensee et al. 2021): clip to ``clip_hu`` (the 0.5 / 99.5
      percentiles of the training subjects' foreground voxels), then ``(HU - mean_hu) / std_hu`` with the
      mean and SD of those voxels (before the clip, as nnU-Net). Fixed numbers: a scan's own field of view
      (air, table, chest) cannot change them.
    * ``volume_zscore`` (the earlier scheme, kept to evaluate models trained with it): clip to
      ``clip_hu`` (``data.hu_window``), then the mean and SD of the clipped *input volume*: they change
      with the field of view.
    """

    scheme: str
    clip_hu: tuple[float, float]
    mean_hu: float | None = None
    std_hu: float | None = None
    source: str = ""

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise MedistillError(f"normalisation scheme {self.scheme!r} is not one of {SCHEMES}")
        if self.scheme == "ct_fixed" and not (self.std_hu is not None and self.std_hu > 0):
            raise MedistillError(f"ct_fixed normalisation needs mean_hu and std_hu > 0, got {self.std_hu}")

    def apply(self, hu: np.ndarray) -> tuple[np.ndarray, float]:
        """``X Y Z`` HU -> (network input float32, the input value of air for padding)."""
        lo, hi = self.clip_hu
        x = np.clip(hu, lo, hi)
        if self.scheme == "volume_zscore":
            mean, std = float(x.mean()), float(x.std()) + 1e-6  # the volume's own statistics
        else:
            mean, std = float(self.mean_hu), float(self.std_hu)  # type: ignore[arg-type]
        return ((x - mean) / std).astype(np.float32), (lo - mean) / std

    def to_dict(self) -> dict[str, Any]:
        return {
            "scheme": self.scheme,
            "clip_hu": [float(v) for v in self.clip_hu],
            "mean_hu": self.mean_hu,
            "std_hu": self.std_hu,
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> Normalisation:
        try:
            return cls(
                str(d["scheme"]),
                (float(d["clip_hu"][0]), float(d["clip_hu"][1])),
                None if d.get("mean_hu") is None else float(d["mean_hu"]),
                None if d.get("std_hu") is None else float(d["std_hu"]),
                str(d.get("source", "")),
            )
        except (KeyError, TypeError, IndexError, ValueError) as exc:
            raise MedistillError(f"{where}: not a normalisation record ({exc!r})") from None


def fit_ct_normalisation(hus: list[np.ndarray], labels: list[np.ndarray], ids: list[str]) -> Normalisation:
    """nnU-Net's CT statistics of the foreground (label > 0) voxels of the training subjects, on the
    working grid: 0.5 / 99.5 percentiles (the clip), mean and SD (HU)."""
    fg = np.concatenate([h[lab > 0].astype(np.float64) for h, lab in zip(hus, labels, strict=True)])
    if fg.size < 2:
        raise MedistillError(f"training subjects {ids[:5]} hold no foreground voxels to normalise by")
    lo, hi = np.percentile(fg, [0.5, 99.5])
    return Normalisation(
        "ct_fixed",
        (float(lo), float(hi)),
        float(fg.mean()),
        max(float(fg.std()), 1e-6),
        f"foreground voxels (label > 0) of {len(ids)} training subjects ({fg.size} on the working grid)",
    )


class NormalisationState:
    """The normalisation as checkpointed training state: a resumed stage must see the same numbers."""

    def __init__(self, norm: Normalisation) -> None:
        self.norm = norm

    def state_dict(self) -> dict[str, Any]:
        return self.norm.to_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = Normalisation.from_dict(state, "checkpoint state 'normalisation'")
        if saved.to_dict() | {"source": ""} != self.norm.to_dict() | {"source": ""}:
            raise MedistillError(
                f"the checkpoint was trained with normalisation {saved.to_dict()}, the data now gives "
                f"{self.norm.to_dict()}; train in a new run folder"
            )


# -------------------------------------------------------------------------------------- preprocessing


@dataclass
class Grid:
    """A CT on the working grid (RAS, ``spacing_mm``) and how to get back to its file's grid.

    ``hu``: ``X Y Z`` HU float32; ``ornt``: nibabel orientation transform file -> RAS; ``ras_shape``: file
    shape after reorientation; ``affine``: working affine.
    """

    hu: np.ndarray
    ornt: np.ndarray
    ras_shape: tuple[int, int, int]
    affine: np.ndarray


@dataclass
class Volume(Grid):
    """A :class:`Grid` with its network input ``image`` (``X Y Z`` float32, normalised) and the input
    value of air ``pad_value`` (the sliding window pads with it)."""

    image: np.ndarray = None  # type: ignore[assignment]
    pad_value: float = 0.0


def resample(array: np.ndarray, shape: tuple[int, ...], label: bool) -> np.ndarray:
    """Resample ``X Y Z`` to ``shape`` over the same field of view (labels: nearest, never linear)."""
    if tuple(array.shape) == tuple(shape):
        return array
    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    if label:
        return F.interpolate(t, size=shape, mode="nearest-exact")[0, 0].numpy().astype(array.dtype)
    return F.interpolate(t, size=shape, mode="trilinear", align_corners=False)[0, 0].numpy()


def to_ras(image: Image) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(array reoriented to RAS, its affine, the orientation transform) by axis permutation/flips only."""
    ornt = nib.orientations.io_orientation(image.affine)
    array = nib.orientations.apply_orientation(np.asarray(image.array), ornt)
    affine = image.affine @ nib.orientations.inv_ornt_aff(ornt, image.shape)
    return array, affine, ornt


def working_shape(shape: tuple[int, ...], spacing: tuple[float, ...], target: tuple[float, ...]) -> tuple:
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target, strict=True))


def working_grid(image: Image, spacing_mm: tuple[float, ...]) -> Grid:
    """Orient to RAS (axis permutation/flips only) and resample to ``spacing_mm`` over the same field of
    view (trilinear); HU unchanged otherwise."""
    if image.ndim != 3:
        raise MedistillError(f"expected a 3D CT volume, got shape {image.shape}")
    ras, affine, ornt = to_ras(image)
    spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
    shape = working_shape(ras.shape, spacing, spacing_mm)
    hu = resample(ras.astype(np.float32), shape, label=False)
    scale = np.diag([*(np.asarray(ras.shape) / np.asarray(shape)), 1.0])
    scale[:3, 3] = (np.asarray(ras.shape) / np.asarray(shape) - 1) / 2  # same field of view
    return Grid(hu, ornt, tuple(int(s) for s in ras.shape), affine @ scale)  # type: ignore[arg-type]


def normalised(grid: Grid, norm: Normalisation) -> Volume:
    """``grid`` with its network input under ``norm``."""
    image, pad = norm.apply(grid.hu)
    return Volume(grid.hu, grid.ornt, grid.ras_shape, grid.affine, image, pad)


def preprocess(image: Image, spacing_mm: tuple[float, ...], norm: Normalisation) -> Volume:
    """A CT file's image on the working grid, normalised by ``norm``."""
    return normalised(working_grid(image, spacing_mm), norm)


def through_plane_axis(spacing_mm: tuple[float, ...]) -> int:
    """The working grid's through-plane axis: the axis of the largest spacing (nnU-Net's choice). Of
    equal spacings the first wins, so isotropic grids give axis 0 (RAS x), the nets' earlier default."""
    return int(np.argmax(np.asarray(spacing_mm, dtype=float)))


def label_to_working(label: Image, shape: tuple[int, ...], lut: np.ndarray) -> np.ndarray:
    """Label map (file values) -> class indices ``0..K-1`` on the working grid (nearest neighbour)."""
    ras, _, _ = to_ras(label)
    idx = lut[np.rint(ras).astype(np.int64)]
    return resample(idx.astype(np.uint8), shape, label=True)


# --------------------------------------------------------------------------------------------- datasets


class PatchSet(KeyedDataset):
    """Training patches ``(1, *patch)``: foreground-oversampled, with flips, rotation/zoom and intensity.

    ``volumes``: working-grid images; ``labels``: class indices; ``lr_swap``: class index -> its mirror
    (left <-> right organ) applied when flipping axis 0 (RAS x, left-right); ``air``: each volume's input
    value of air, for the part of a patch past the volume's edge (``d.beyond_edge``).
    """

    def __init__(
        self,
        volumes: list[np.ndarray],
        labels: list[np.ndarray],
        d: Seg3DData,
        lr_swap: np.ndarray,
        air: list[float],
    ) -> None:
        self.volumes, self.labels, self.d, self.lr_swap, self.air = volumes, labels, d, lr_swap, air
        # a subsample of each class's voxels per volume, for foreground-centred patches
        self.fg: list[list[np.ndarray]] = []
        for lab in labels:
            per_class = []
            for k in range(1, int(lr_swap.size)):
                where = np.argwhere(lab == k)
                if len(where):
                    per_class.append(where[:: max(1, len(where) // 2000)])
            self.fg.append(per_class)

    def __len__(self) -> int:
        return len(self.volumes)

    def get(self, index: int, rng: np.random.Generator | None) -> dict[str, torch.Tensor]:
        rng = rng or np.random.default_rng(index)
        d, img, lab = self.d, self.volumes[index], self.labels[index]
        patch = np.asarray(d.patch)
        shape = np.asarray(img.shape)
        if self.fg[index] and rng.random() < d.fg_fraction:
            cls = self.fg[index][rng.integers(len(self.fg[index]))]
            centre = cls[rng.integers(len(cls))]
        else:
            centre = rng.integers(0, shape)
        reach = (patch * d.beyond_edge).astype(int)
        lo = np.clip(centre - patch // 2, -reach, np.maximum(shape - patch + reach, -reach))
        x = torch.from_numpy(crop_padded(img, lo, patch, self.air[index]))[None, None]
        y = torch.from_numpy(crop_padded(lab, lo, patch, 0).astype(np.int64))[None, None]
        angle = np.deg2rad(rng.uniform(-d.rotate_deg, d.rotate_deg))
        zoom = 1.0 + rng.uniform(-d.scale, d.scale)
        if angle or zoom != 1.0:  # rotation in the axial (x, y) plane and isotropic zoom, about the centre
            c, s = np.cos(angle) / zoom, np.sin(angle) / zoom
            theta = torch.tensor([[1 / zoom, 0, 0, 0], [0, c, -s, 0], [0, s, c, 0]], dtype=torch.float32)
            grid = F.affine_grid(theta[None], list(x.shape), align_corners=False)  # (W, H, D) = (z, y, x)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
            y = F.grid_sample(y.float(), grid, mode="nearest", padding_mode="border", align_corners=False)
            y = y.long()
        if rng.random() < d.flip_lr:
            x, y = x.flip(2), torch.from_numpy(self.lr_swap)[y.flip(2)]
        x = x * (1 + rng.uniform(-d.intensity, d.intensity)) + rng.uniform(-d.intensity, d.intensity)
        x = x + float(rng.uniform(0, d.noise)) * torch.from_numpy(rng.standard_normal(x.shape, np.float32))
        return {"image": x[0].float(), "label": y[0]}


def crop_padded(array: np.ndarray, lo: np.ndarray, size: np.ndarray, fill: float) -> np.ndarray:
    """``array[lo : lo + size]`` per axis, where the box may reach past the edges: the outside is ``fill``."""
    out = np.full(tuple(int(n) for n in size), fill, dtype=array.dtype)
    src = tuple(slice(max(a, 0), min(a + n, s)) for a, n, s in zip(lo, size, array.shape, strict=True))
    dst = tuple(slice(r.start - a, r.stop - a) for r, a in zip(src, lo, strict=True))
    out[dst] = array[src]
    return out


class CaseIndex(Dataset):
    """Validation items are case indices: whole volumes of different sizes cannot be collated."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"index": torch.tensor(i)}


def lr_mirror(labels: dict[str, int], values: list[int]) -> np.ndarray:
    """Class index -> index of its left/right mirror (``kidney_left`` <-> ``kidney_right``), else itself."""
    index = {name: values.index(v) for name, v in labels.items()}
    swap = np.arange(len(values))
    for name, k in index.items():
        for a, b in (("left", "right"), ("right", "left")):
            other = name.replace(a, b)
            if a in name and other in index:
                swap[k] = index[other]
    return swap


# ------------------------------------------------------------------------------------------------ task


@TASKS.register("seg3d")
class Seg3DTask(Task):
    """Teacher -> LCOV-Net + CAKD/MSKD -> no-KD ablation on a 3D multi-organ CT dataset (MSD/nnU-Net)."""

    Config = Seg3DConfig
    val_metric = "dice"
    val_mode = "max"

    def __init__(self, cfg: Seg3DConfig, run_dir: str | Path) -> None:
        super().__init__(cfg, run_dir)
        self.cfg: Seg3DConfig = cfg
        self._cache: dict[str, Any] = {}

    # --- dataset -----------------------------------------------------------------------------------
    def dataset(self):
        """The dataset description (validated once: files, grids, label values) and its split."""
        if "dataset" in self._cache:
            return self._cache["dataset"], self._cache["split"]
        from medistill.io.datasets import load_dataset, validate

        d = self.cfg.data
        if d.dataset is None:
            root = self.run_dir / "cohort"
            if not (root / "dataset.json").exists():
                c = d.cohort
                spacing = (c.spacing_mm,) * 3
                spec = CohortSpec(c.n_subjects, c.seed, spacing, min_volume_ml=c.min_volume_ml, split=d.split)
                make_cohort(root, spec)
            path: Path = root
        else:
            path = Path(d.dataset)
        spec = load_dataset(path)
        if len(spec.channel_names) > 1:
            raise MedistillError(
                f"{path}: seg3d takes single-channel CT, the dataset has {spec.channel_names}"
            )
        validate(spec)  # label values not in the label list, grid mismatches, missing files: fail now
        if len(spec.labels) < 2:
            raise MedistillError(f"{path}: needs background and at least one organ label")
        ids = [c.id for c in spec.cases]
        split = read_splits(spec.root)
        if split is None:
            from medistill.tasks.cohort import split_ids

            split = split_ids(ids, d.split, self.cfg.seed)
        unknown = sorted(set(sum(split.values(), [])) - set(ids))
        if unknown:
            raise MedistillError(f"{spec.root}/splits.json names cases not in the dataset: {unknown[:5]}")
        self._cache.update(dataset=spec, split=split)
        return spec, split

    @property
    def values(self) -> list[int]:
        """Label values in class-index order (class k is the k-th smallest value; 0 = background)."""
        return sorted(self.dataset()[0].labels.values())

    @property
    def organ_names(self) -> dict[int, str]:
        spec = self.dataset()[0]
        return {k: spec.label_names[v] for k, v in enumerate(self.values) if k > 0}

    def _lut(self) -> np.ndarray:
        lut = np.zeros(max(self.values) + 1, dtype=np.int64)
        lut[self.values] = np.arange(len(self.values))
        return lut

    def case_file(self, case_id: str):
        return next(c for c in self.dataset()[0].cases if c.id == case_id)

    def load_grid(self, case_id: str) -> tuple[Grid, np.ndarray]:
        """A case on the working grid: its HU and class-index labels (cached)."""
        key = f"grid:{case_id}"
        if key not in self._cache:
            case = self.case_file(case_id)
            grid = working_grid(read_image(case.images[0]), self.cfg.data.spacing_mm)
            lab = label_to_working(read_image(case.label), grid.hu.shape, self._lut())
            self._cache[key] = (grid, lab)
        return self._cache[key]

    def load_case(self, case_id: str, norm: Normalisation | None = None) -> tuple[Volume, np.ndarray]:
        """A case on the working grid, normalised by ``norm`` (default: this config's, see
        :meth:`normalisation`), and its class-index labels."""
        grid, lab = self.load_grid(case_id)
        return normalised(grid, norm or self.normalisation()), lab

    # --- normalisation -----------------------------------------------------------------------------
    def normalisation(self) -> Normalisation:
        """The normalisation this config trains with: ``ct_fixed`` statistics from the training subjects
        (computed once), or the ``volume_zscore`` of ``data.hu_window``."""
        if "norm" not in self._cache:
            d = self.cfg.data
            if d.normalisation == "volume_zscore":
                norm = Normalisation("volume_zscore", tuple(d.hu_window), source="data.hu_window")
            else:
                ids = self.dataset()[1]["train"]
                grids = [self.load_grid(cid) for cid in ids]
                norm = fit_ct_normalisation([g.hu for g, _ in grids], [lab for _, lab in grids], ids)
            self._cache["norm"] = norm
        return self._cache["norm"]

    def setup_stage(self, ctx: Any) -> None:
        """Store the normalisation with the stage: ``RUN/<stage>/normalisation.json`` and ``last.pt``."""
        norm = self.normalisation()
        ctx.add_state("normalisation", NormalisationState(norm))
        if ctx.dist.is_main:
            atomic_write_text(
                self.run_dir / ctx.stage / NORM_FILE, json.dumps(norm.to_dict(), indent=2) + "\n"
            )

    def stage_normalisation(self, stage: str) -> Normalisation:
        """The normalisation a trained ``stage`` was trained with (its record, never the input's FOV).

        A stage trained before the record existed has none; its checkpoint's config then has no
        ``data.normalisation`` either, and the only scheme there was is taken: ``volume_zscore``.
        """
        key = f"norm:{stage}"
        if key in self._cache:
            return self._cache[key]
        path = self.run_dir / stage / NORM_FILE
        if path.is_file():
            norm = Normalisation.from_dict(json.loads(path.read_text()), str(path))
        else:
            from medistill.engine.checkpoint import load_checkpoint

            ckpt = self.runner.ckpt(stage)
            data = (yaml.safe_load(load_checkpoint(ckpt).get("config") or "{}") or {}).get("data", {})
            if "normalisation" in data:
                raise MedistillError(
                    f"{path} is missing: the normalisation {ckpt} was trained with is unknown"
                )
            window = data.get("hu_window", self.cfg.data.hu_window)
            norm = Normalisation(
                "volume_zscore", (float(window[0]), float(window[1])), source=f"{ckpt} (legacy)"
            )
        self._cache[key] = norm
        return norm

    def _check_patch(self, case_id: str, shape: tuple[int, ...]) -> None:
        patch = self.cfg.data.patch
        if any(p > s for p, s in zip(patch, shape, strict=True)):
            raise MedistillError(
                f"case {case_id!r}: data.patch {tuple(patch)} is larger than the volume {tuple(shape)} after "
                f"resampling to {tuple(self.cfg.data.spacing_mm)} mm; use a smaller patch or a finer spacing"
            )

    def build_data(self) -> tuple[PatchSet, CaseIndex]:
        _, split = self.dataset()
        vols, labs, air = [], [], []
        for cid in split["train"] + split["val"]:
            vol, lab = self.load_case(cid)  # ct_fixed: statistics of the training subjects, computed once
            self._check_patch(cid, vol.image.shape)
            if cid in split["train"]:
                vols.append(vol.image)
                labs.append(lab)
                air.append(vol.pad_value)
        spec = self.dataset()[0]
        swap = lr_mirror(spec.labels, self.values)
        return PatchSet(vols, labs, self.cfg.data, swap, air), CaseIndex(len(split["val"]))

    def splits(self) -> dict[str, list[str]]:
        return {k: list(v) for k, v in self.dataset()[1].items()}

    # --- models ------------------------------------------------------------------------------------
    @property
    def n_classes(self) -> int:
        return len(self.values)

    def net_args(self, key: str, spec: ModelSpec, probe: bool = False) -> dict[str, Any]:
        """3D, one CT channel, one output per class (2 when only probing the configuration); nets with a
        through-plane direction (LCOV-Net's 1-D kernel, the teacher's anisotropic strides) get the
        working grid's :func:`through_plane_axis`, since the arrays are RAS ``X Y Z``, not ``D H W``."""
        classes = 2 if probe else self.n_classes
        args = {"spatial_dims": 3, "in_channels": 1, "out_channels": classes, "deep_supervision": True}
        if "through_plane_axis" in inspect.signature(NETS.get(spec.name)).parameters:
            args["through_plane_axis"] = through_plane_axis(self.cfg.data.spacing_mm)
        return args

    def build_model(self, key: str, spec: ModelSpec, probe: bool = False) -> torch.nn.Module:
        net = super().build_model(key, spec, probe)
        require_divisible(net, self.cfg.data.patch, "data.patch", spec.name)
        return net

    # --- steps -------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], ctx: Any) -> dict[str, float]:
        return supervised_step(ctx, batch["image"], batch["label"])

    @torch.no_grad()
    def infer(self, net: torch.nn.Module, vol: Volume) -> torch.Tensor:
        """Class probabilities ``K X Y Z`` on the working grid (Gaussian-weighted sliding window)."""
        net.eval()
        device = next(net.parameters()).device
        x = torch.from_numpy(vol.image)[None, None].to(device)
        d = self.cfg.data
        logits = sliding_window_inference(
            x, d.patch, d.sw_batch, net, overlap=d.sw_overlap, mode="gaussian", cval=vol.pad_value
        )
        return torch.softmax(logits[0].float(), 0).cpu()

    def validate(self, ctx: Any, loader: Any) -> dict[str, float]:
        _, split = self.dataset()
        scores = []
        for batch in loader:
            for i in batch["index"].tolist():
                vol, lab = self.load_case(split["val"][i])
                pred = self.infer(ctx.models["net"], vol).argmax(0).numpy()
                scores += [dice(pred == k, lab == k) for k in range(1, self.n_classes) if (lab == k).any()]
        return {"dice": float(np.mean(scores))}

    # --- after training ----------------------------------------------------------------------------
    def deploy_inputs(self, stage: str, model: str) -> dict[str, torch.Tensor]:
        """A patch of a real validation volume (centred on its organs), at the training patch size."""
        vol, lab = self.load_case(self.dataset()[1]["val"][0], self.stage_normalisation(stage))
        centre = np.argwhere(lab > 0).mean(0).astype(int) if (lab > 0).any() else np.array(lab.shape) // 2
        x = torch.from_numpy(vol.image)[None, None]
        starts = [
            int(np.clip(c - p // 2, 0, max(0, n - p)))
            for c, p, n in zip(centre, self.cfg.data.patch, lab.shape, strict=True)
        ]
        patch = x[(..., *(slice(a, a + p) for a, p in zip(starts, self.cfg.data.patch, strict=True)))]
        pad = [
            q
            for p, n in reversed(list(zip(self.cfg.data.patch, patch.shape[2:], strict=True)))
            for q in (0, p - n)
        ]
        return {"image": F.pad(patch, pad, value=vol.pad_value)}

    def whole_input(self, stage: str, model: str) -> tuple[str, dict[str, torch.Tensor]]:
        cid = self.dataset()[1]["test"][0]
        vol, _ = self.load_case(cid, self.stage_normalisation(stage))
        shape = "x".join(str(n) for n in vol.image.shape)
        return f"test subject {cid}, {shape} voxels at {self.cfg.data.spacing_mm} mm, sliding window", {
            "image": torch.from_numpy(vol.image)[None, None]
        }

    def whole_inference(self, predict: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        from medistill.deploy.profile import single, sliding_window

        d = self.cfg.data
        return sliding_window(single(predict, "image"), inputs["image"], d.patch, d.sw_overlap, d.sw_batch)

    def predict_volume(self, net: torch.nn.Module, image: Image, norm: Normalisation) -> np.ndarray:
        """Label values on ``image``'s own grid: working-grid probabilities (sliding window over any
        extent, input normalised by the model's ``norm``) resampled back per class."""
        vol = preprocess(image, self.cfg.data.spacing_mm, norm)
        prob = self.infer(net, vol)
        best = torch.full(vol.ras_shape, -1.0)
        arg = torch.zeros(vol.ras_shape, dtype=torch.int64)
        for k in range(prob.shape[0]):  # one class at a time: a full-size K-channel volume may not fit
            p = F.interpolate(prob[k][None, None], size=vol.ras_shape, mode="trilinear", align_corners=False)[
                0, 0
            ]
            better = p > best
            best = torch.where(better, p, best)
            arg[better] = k
        values = np.asarray(self.values)[arg.numpy()]
        to_file = nib.orientations.ornt_transform(RAS_ORNT, vol.ornt)  # the inverse of file -> RAS
        return nib.orientations.apply_orientation(values, to_file)

    def predict_file(self, src: Path, dst: Path) -> Path:
        """Segment a CT with the last deployable network (the distilled student), normalised as it was
        trained; writes label values in the input's geometry."""
        img = read_ct(src, override=None)
        stage, model = self.runner.deployables()[-1]
        labels = self.predict_volume(self.stage_model(stage, model), img, self.stage_normalisation(stage))
        dtype = np.uint8 if max(self.values) < 256 else np.int16
        write_image(img.with_array(labels.astype(dtype)), dst, dtype=dtype)
        return dst

    def deploy_contract(self, stage: str, model: str) -> dict[str, Any]:
        """What a deployment must do around the network: orientation, spacing, normalisation (with its
        statistics), sliding window, and how logits become label values."""
        d = self.cfg.data
        labels = {
            str(k): {"name": self.dataset()[0].label_names[v], "value": v} for k, v in enumerate(self.values)
        }
        return super().deploy_contract(stage, model) | {
            "input": "one CT channel, array axes RAS X Y Z (nibabel's as_closest_canonical), HU",
            "spacing_mm": list(d.spacing_mm),
            "through_plane_axis": through_plane_axis(d.spacing_mm),
            "normalisation": self.stage_normalisation(stage).to_dict(),
            "sliding_window": {
                "roi": list(d.patch),
                "overlap": d.sw_overlap,
                "mode": "gaussian",
                "pad": "normalised air (the lower clip)",
            },
            "output": "logits B K X Y Z; softmax over K; argmax = class index (labels: its name, value)",
            "labels": labels,
        }

    def evaluate(self, out_dir: Path) -> dict[str, Any]:
        """Per-organ Dice and HD95 (mm) of every trained stage's network on the test subjects."""
        from medistill.nets import count_parameters

        models = {st: self.stage_model(st) for st in self.stage_names()}
        if not models:
            raise MedistillError(f"{self.run_dir}: no trained stage (run `medistill train` first)")
        spec, split = self.dataset()
        organs = self.organ_names
        per_case: dict[str, dict[str, dict[str, float]]] = {m: {} for m in models}
        for cid in split["test"]:
            case = self.case_file(cid)
            img, lab = read_image(case.images[0]), read_image(case.label)
            truth = np.rint(np.asarray(lab.array)).astype(np.int64)
            for name, net in models.items():
                pred = self.predict_volume(net, img, self.stage_normalisation(name))
                per_case[name][cid] = organ_scores(pred, truth, organs, self.values, img.spacing)
        summaries = {m: summarise(cases, organs) for m, cases in per_case.items()}
        per_organ = {m: sm["structures"] for m, sm in summaries.items()}
        nan = float("nan")
        cases = {
            m: {  # the mean over organs per subject, then mean and SD over the test subjects
                "dice_mean": sm["overall"]["dice"],
                "dice_sd": sm["overall"]["dice_sd"],
                "hd95_mean_mm": sm["overall"].get("hd95_mm", nan),
                "hd95_sd_mm": sm["overall"].get("hd95_sd_mm", nan),
                "misses": sm["overall"]["misses"],
                "false_positives": sm["overall"]["false_positives"],
                "empty_excluded": sm["overall"]["empty_excluded"],
                "params": int(count_parameters(models[m])),
                "test_subjects": len(split["test"]),
            }
            for m, sm in summaries.items()
        }
        out_dir = Path(out_dir)
        (out_dir / "per_organ.md").write_text(per_organ_markdown(per_organ, organs))
        figures = [str(self.overlay_figure(models, split["test"][0], out_dir / "overlay.png"))]
        figures.append(str(self.curves_figure(out_dir / "curves_stages.png")))
        note = (
            f"{spec.name}: {len(split['test'])} test subjects"
            + (" (synthetic cohort from chest-ct)" if self.cfg.data.dataset is None else "")
            + "; dice_mean / hd95_mean_mm: mean over organs per subject, then mean and SD over subjects; "
            "a missed or hallucinated organ scores Dice 0 and HD95 = the image diagonal (counted in misses / "
            "false_positives), empty vs empty is excluded (counted); input normalisation: "
            + ", ".join(f"{m} {self.stage_normalisation(m).scheme}" for m in models)
        )
        return {
            "cases": cases,
            "per_organ": per_organ,
            "per_case": per_case,
            "note": note,
            "figures": figures,
        }

    def curves_figure(self, out: Path) -> Path:
        from medistill.report.figures import plot_training_curves

        stages = {
            s: self.run_dir / s
            for s in self.stage_names(trained_only=False)
            if (self.run_dir / s / "metrics.jsonl").exists()
        }
        return plot_training_curves(stages, out, val_metric="dice")

    def overlay_figure(self, models: dict[str, torch.nn.Module], case_id: str, out: Path) -> Path:
        """Axial and coronal slices of one test subject: CT, ground truth, each model's prediction."""
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap

        from medistill.report.figures import save_figure

        grid, lab = self.load_grid(case_id)
        preds = {
            name: self.infer(net, self.load_case(case_id, self.stage_normalisation(name))[0])
            .argmax(0)
            .numpy()
            for name, net in models.items()
        }
        fg = lab > 0
        z = int(np.argmax(fg.sum((0, 1))))
        y = int(np.argmax(fg.sum((0, 2))))
        # radiological display: patient right on the left, anterior / superior up
        views = {
            f"axial z={z}": lambda a: np.flipud(a[:, :, z].T)[:, ::-1],
            f"coronal y={y}": lambda a: np.flipud(a[:, y, :].T)[:, ::-1],
        }
        columns = {"CT": None, "ground truth": lab, **preds}
        colours = plt.get_cmap("tab20")(np.linspace(0, 1, 20))[: self.n_classes]
        colours[0] = (0, 0, 0, 0)
        cmap = ListedColormap(colours)
        fig, axes = plt.subplots(2, len(columns), figsize=(2.6 * len(columns), 4.8), squeeze=False)
        for r, (title, view) in enumerate(views.items()):
            for c, (name, labels) in enumerate(columns.items()):
                ax = axes[r, c]
                ax.imshow(
                    view(grid.hu),
                    cmap="gray",
                    vmin=self.cfg.data.hu_window[0],
                    vmax=self.cfg.data.hu_window[1],
                )
                if labels is not None:
                    ax.imshow(
                        view(labels),
                        cmap=cmap,
                        vmin=0,
                        vmax=self.n_classes - 1,
                        alpha=0.5,
                        interpolation="nearest",
                    )
                ax.set_title(f"{name}\n{case_id} {title}", fontsize=7)
                ax.axis("off")
        handles = [plt.Rectangle((0, 0), 1, 1, color=colours[k]) for k in sorted(self.organ_names)]
        fig.legend(handles, list(self.organ_names.values()), loc="lower center", ncol=6, fontsize=7)
        return save_figure(fig, out)


def organ_scores(
    pred: np.ndarray, truth: np.ndarray, organs: dict[int, str], values: list[int], spacing: tuple[float, ...]
) -> dict[str, float | str]:
    """Dice, HD95 (mm) and status per organ of label-value maps on the same grid (shared metric rules: a
    missed or hallucinated organ scores Dice 0 and HD95 = image diagonal; empty vs empty is NaN)."""
    scores = score_structures(
        {name: pred == values[k] for k, name in organs.items()},
        {name: truth == values[k] for k, name in organs.items()},
        spacing_mm=spacing,
    )
    out: dict[str, float | str] = {}
    for name, s in scores.items():
        out |= {f"dice_{name}": s["dice"], f"hd95_{name}": s["hd95_mm"], f"status_{name}": s["status"]}
    return out


def summarise(cases: dict[str, dict[str, Any]], organs: dict[int, str]) -> dict[str, Any]:
    """:func:`medistill.metrics.segmentation.summarise` of :func:`organ_scores` rows: per organ and
    overall, mean and SD over cases of Dice and HD95, n, misses, false positives, empty exclusions."""
    nested = {
        cid: {
            n: {"dice": c[f"dice_{n}"], "hd95_mm": c[f"hd95_{n}"], "status": c[f"status_{n}"]}
            for n in organs.values()
        }
        for cid, c in cases.items()
    }
    return summarise_scores(nested)


def per_organ_markdown(per_organ: dict[str, dict[str, dict[str, Any]]], organs: dict[int, str]) -> str:
    """A markdown table: organ x model, Dice % and HD95 mm (mean ± SD over cases), n and miss counts."""
    return summary_markdown(
        {m: {"structures": {name: s[name] for name in organs.values()}} for m, s in per_organ.items()},
        unit="test cases",
    )
