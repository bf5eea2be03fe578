"""Real inter-patient registration pairs: a shared classical pre-alignment, then each deformable method.

The synthetic cohort measures recovery of known fields; a real pair (two people, two scanners, two
fields of view) measures what a user meets. Two scans rarely share a field of view or a world origin, so
every method starts from the same **classical affine pre-alignment** (SimpleITK: centre of intensity
mass, then a rigid and an affine stage on Mattes mutual information, on coarse copies of both volumes);
then the moving image and labels are resampled through it onto the fixed image's network grid
(``data.size^3`` over the fixed image's world box, as the task's data) and each method registers that
pair. Scores are the warped moving labels against the fixed labels per structure (Dice, HD95 in mm; a
missed structure scores 0 and stays in every mean), folding of the deformable field and its time.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from pydantic import Field, model_validator

from medistill.config import StrictModel
from medistill.errors import MedistillError
from medistill.io.images import Image, check_same_grid, read_image
from medistill.tasks.registration_data import (
    Modality,
    merge_labels,
    network_grid,
    normalise_intensity,
    resample,
    to_network_grid,
)

#: structures scored on real pairs, per example: name -> label values (chest-ct: its TotalSegmentator ids;
#: its lung lobes are merged, its vertebrae C1..S1 and sacrum are "spine", its 24 ribs are "ribs"; sternum
#: and costal cartilages are left out, as chest-ct-2 labels them in none of its segments)
REAL_LABELS: dict[str, dict[str, list[int]]] = {
    "chest-ct": {"lungs": list(range(10, 15)), "spine": list(range(25, 51)), "ribs": list(range(92, 116))},
    # brain-mr / head-mr: the GM / WM maps of :mod:`medistill.tasks.brain_tissue` (skull-stripped T1)
    "brain-mr": {"GM": [1], "WM": [2]},
    "head-mr": {"GM": [1], "WM": [2]},
}
#: chest-ct-2 by segment name (its NRRD header), resolved to values when read
REAL_SEGMENTS: dict[str, dict[str, list[str]]] = {
    "chest-ct-2": {
        "lungs": ["right lung", "left lung"],
        "spine": ["cervical vertebral column", "thoracic vertebral column", "lumbar vertebral column"],
        "ribs": ["ribs"],
    },
}
RealExample = Literal["chest-ct", "chest-ct-2", "brain-mr", "head-mr"]
#: intensity scaling of each example when the pair does not set `modality` (a brain pair in a CT run is MR)
REAL_MODALITY: dict[str, Modality] = {"chest-ct": "ct", "chest-ct-2": "ct", "brain-mr": "mr", "head-mr": "mr"}

#: the classical pre-alignments (``none``: the two world boxes are taken as corresponding)
PrealignKind = Literal["affine", "rigid", "none"]
PREALIGN_KINDS: tuple[str, ...] = get_args(PrealignKind)
#: grid of the coarse copies the affine pre-alignment runs on (per axis, over each volume's world box)
PREALIGN_SIZE = 64


class RealVolume(StrictModel):
    """One side of a real pair: an example set, or an own image with its label map."""

    example: RealExample | None = Field(
        None, description="example set (chest-ct, chest-ct-2; brain-mr, head-mr: skull-stripped T1, GM/WM)"
    )
    image: Path | None = Field(None, description="own volume (NIfTI, MHA, NRRD, DICOM)")
    label: Path | None = Field(None, description="label map on the own volume's grid")
    labels: dict[str, list[int]] | None = Field(
        None, description="structures {name: label values}; default per example"
    )
    modality: Literal["ct", "mr"] | None = Field(
        None, description="intensity scaling; default the example's, else the run's"
    )

    @model_validator(mode="after")
    def _one_source(self) -> RealVolume:
        if (self.example is None) == (self.image is None):
            raise ValueError("give either `example` or `image` (+ `label` and `labels`)")
        if self.image is not None and (self.label is None or self.labels is None):
            raise ValueError("an own `image` needs `label` (its label map) and `labels` ({name: values})")
        return self

    def describe(self) -> str:
        return self.example or Path(str(self.image)).name.split(".")[0]


class RealPair(StrictModel):
    """A real pair: ``moving`` is registered to ``fixed``; both must name the same structures."""

    fixed: RealVolume
    moving: RealVolume
    name: str | None = Field(None, description="row name (default 'moving -> fixed')")
    prealign: PrealignKind = Field(
        "affine", description="classical pre-alignment shared by every method (SimpleITK, Mattes MI)"
    )

    def label(self) -> str:
        return self.name or f"{self.moving.describe()} -> {self.fixed.describe()}"


class RealEval(StrictModel):
    real_pairs: list[RealPair] = Field(
        [], description="real pairs evaluated after the synthetic test pairs (own table and figure)"
    )


def load_volume(v: RealVolume, where: str) -> tuple[Image, Image, list[str]]:
    """(raw image, label map of structure indices 1..K, the K structure names) of one side of a pair."""
    from medistill.io.examples import cache_dir, example_file

    if v.example == "chest-ct":
        img = read_image(example_file("chest-ct", "cxr.nii.gz"))
        lab = read_image(example_file("chest-ct", "mask.nii.gz"))
        structures = v.labels or REAL_LABELS["chest-ct"]
    elif v.example == "chest-ct-2":
        from medistill.io.example_formats import load_chest_ct_2

        img, lab, names = load_chest_ct_2(cache_dir("chest-ct-2"))
        by_name = {n.strip().lower(): value for n, value in names.items()}
        structures = v.labels or {
            s: [by_name[n] for n in segs if n in by_name] for s, segs in REAL_SEGMENTS["chest-ct-2"].items()
        }
    elif v.example in ("brain-mr", "head-mr"):
        from medistill.tasks.brain_tissue import load_brain_tissue

        tissue = load_brain_tissue(v.example)
        img, lab = tissue.t1, tissue.labels
        structures = v.labels or REAL_LABELS[v.example]
    else:
        img, lab = read_image(v.image), read_image(v.label)
        if img.ndim != 3:
            raise MedistillError(f"{where}.image {v.image}: expected a 3D volume, got shape {img.shape}")
        structures = v.labels or {}
    check_same_grid(img, lab, f"{where} image", f"{where} labels")
    empty = [s for s, values in structures.items() if not values]
    if empty:
        raise MedistillError(f"{where}: structures {empty} have no label values")
    return img, lab.with_array(merge_labels(lab.array, structures)), list(structures)


def _ras_grid_to_sitk(array: torch.Tensor, grid: np.ndarray) -> Any:
    """A ``X Y Z`` array on a RAS-aligned diagonal grid -> a SimpleITK image in ITK's LPS world (mm)."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(array.numpy().transpose(2, 1, 0).astype(np.float32))
    img.SetSpacing([float(s) for s in np.diag(grid)[:3]])
    img.SetOrigin([-float(grid[0, 3]), -float(grid[1, 3]), float(grid[2, 3])])
    img.SetDirection([-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0])
    return img


_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def prealign(
    fixed: Image, moving: Image, kind: str, threads: int = 1, size: int = PREALIGN_SIZE
) -> tuple[np.ndarray, float]:
    """The classical pre-alignment: ``4 x 4`` matrix mapping a fixed world point (RAS mm) to its moving
    world point, and its seconds. ``fixed``/``moving`` hold intensities already scaled to [0, 1].

    Centre of intensity mass (``MOMENTS``), then a rigid stage and (``kind="affine"``) an affine stage, each
    on Mattes mutual information (32 bins, 3 levels) between coarse ``size^3`` copies of the volumes
    (so the cost does not grow with the scans' resolution)."""
    import SimpleITK as sitk

    if kind == "none":
        return np.eye(4), 0.0
    t0 = time.perf_counter()
    images = []
    for img in (fixed, moving):
        grid = network_grid(img.affine, img.shape, size)
        images.append(_ras_grid_to_sitk(resample(img.array, img.affine, grid, (size,) * 3)[0], grid))
    f, m = images

    def run(transform: Any, iterations: int) -> Any:
        reg = sitk.ImageRegistrationMethod()
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(0.3, seed=1)
        reg.SetInterpolator(sitk.sitkLinear)
        reg.SetOptimizerAsRegularStepGradientDescent(
            learningRate=1.0, minStep=1e-3, numberOfIterations=iterations, relaxationFactor=0.6
        )
        reg.SetOptimizerScalesFromPhysicalShift()
        reg.SetShrinkFactorsPerLevel([4, 2, 1])
        reg.SetSmoothingSigmasPerLevel([2, 1, 0])
        reg.SetInitialTransform(transform, inPlace=True)
        reg.SetNumberOfThreads(threads)
        reg.Execute(f, m)
        return transform

    rigid = sitk.CenteredTransformInitializer(
        f, m, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS
    )
    tx: Any = run(sitk.Euler3DTransform(rigid), 150)
    if kind == "affine":
        affine = sitk.AffineTransform(3)
        affine.SetCenter(tx.GetCenter())
        affine.SetMatrix(tx.GetMatrix())
        affine.SetTranslation(tx.GetTranslation())
        tx = run(affine, 150)
    a = np.array(tx.GetMatrix()).reshape(3, 3)
    c, t = np.array(tx.GetCenter()), np.array(tx.GetTranslation())
    m_lps = np.eye(4)
    m_lps[:3, :3], m_lps[:3, 3] = a, c + t - a @ c  # ITK: T(x) = A (x - c) + c + t
    return _LPS @ m_lps @ _LPS, time.perf_counter() - t0


def aligned_pair(
    fixed: Image,
    fixed_labels: Image,
    moving: Image,
    moving_labels: Image,
    matrix: np.ndarray,
    size: int,
) -> dict[str, Any]:
    """Fixed image and labels on its network grid, moving image and labels resampled through the
    pre-alignment ``matrix`` (fixed world -> moving world, RAS mm) onto the same grid (zero outside the
    moving scan: a smaller field of view is not extended). Images ``1 S S S``, labels ``1 S S S`` long."""
    f_img, f_lab, grid = to_network_grid(fixed, size, fixed_labels)
    dst = matrix @ grid  # fixed network voxel -> moving world
    m_img = resample(moving.array, moving.affine, dst, (size,) * 3, padding="zeros")
    m_lab = resample(
        moving_labels.array.astype(np.float32),
        moving_labels.affine,
        dst,
        (size,) * 3,
        "nearest",
        padding="zeros",
    )
    return {
        "fixed": f_img,
        "moving": m_img,
        "fixed_labels": f_lab,
        "moving_labels": m_lab.round().long(),
        "grid": grid,
        "spacing": tuple(float(s) for s in np.diag(grid)[:3]),
    }


def load_pair(pair: RealPair, where: str, default: Modality, hu_window: tuple[float, float]) -> tuple:
    """Both sides read, labels merged to the same structure indices, intensities scaled: (fixed, fixed
    labels, moving, moving labels, structure names)."""
    out = []
    names: list[list[str]] = []
    for side in ("fixed", "moving"):
        v: RealVolume = getattr(pair, side)
        img, lab, structures = load_volume(v, f"{where}.{side}")
        modality = v.modality or (REAL_MODALITY[v.example] if v.example else default)
        out += [img.with_array(normalise_intensity(img.array, modality, hu_window)), lab]
        names.append(structures)
    if names[0] != names[1]:
        raise MedistillError(
            f"{where}: fixed structures {names[0]} differ from moving structures {names[1]} (same names, "
            "same order)"
        )
    return (*out, names[0])


def score_pair(pair: dict[str, Any], u: torch.Tensor, structures: list[str]) -> dict[str, Any]:
    """Per structure Dice and HD95 (mm; a miss: Dice 0, HD95 = the grid diagonal) of the moving labels
    warped by ``u`` (``1 3 S S S`` voxels), their means over structures, and folding of ``u``."""
    from medistill.metrics.registration import jacobian_stats, warped_label_dice

    labels = {name: k for k, name in enumerate(structures, start=1)}
    res = warped_label_dice(
        pair["moving_labels"][None], pair["fixed_labels"][None], u, labels, pair["spacing"]
    )
    per = res["structures"]
    row: dict[str, Any] = {}
    for name in structures:
        row[f"dice_{name}"] = per[name]["dice"] if per[name]["n"] else float("nan")
        row[f"hd95_{name}_mm"] = per[name].get("hd95_mm", float("nan")) if per[name]["n"] else float("nan")
    row["dice"] = res["overall"]["dice"]
    row["hd95_mm"] = res["overall"].get("hd95_mm", float("nan"))
    row["misses"] = res["overall"]["misses"] + res["overall"]["false_positives"]
    row["folding_percent"] = jacobian_stats(u, pair["spacing"])["folding_percent"][0]
    return row


def load_aligned_pair(
    spec: RealPair, where: str, size: int, default: Modality, hu_window: tuple[float, float], threads: int
) -> dict[str, Any]:
    """One real pair read (:func:`load_pair`), pre-aligned (:func:`prealign`) and on the fixed image's
    network grid (:func:`aligned_pair`), with its ``name``, ``structures``, ``matrix`` and
    ``prealign_seconds``."""
    fixed, fixed_lab, moving, moving_lab, structures = load_pair(spec, where, default, hu_window)
    matrix, t_pre = prealign(fixed, moving, spec.prealign, threads)
    pair = aligned_pair(fixed, fixed_lab, moving, moving_lab, matrix, size)
    return pair | {
        "name": spec.label(),
        "structures": structures,
        "matrix": matrix,
        "prealign_seconds": t_pre,
    }


def evaluate_real_pairs(
    pairs: list[RealPair],
    methods: dict[str, Any],
    size: int,
    default: Modality,
    hu_window: tuple[float, float],
    threads: int,
) -> tuple[dict[str, dict[str, dict[str, Any]]], list[dict[str, Any]]]:
    """Every method on every real pair: ``{pair: {method: row}}`` (see :func:`score_pair`, plus
    ``seconds`` of the deformable step after one warm-up and the shared ``prealign_seconds``), and the
    aligned pairs (for the figure)."""
    results: dict[str, dict[str, dict[str, Any]]] = {}
    aligned = []
    for k, spec in enumerate(pairs):
        pair = load_aligned_pair(spec, f"eval.real_pairs.{k}", size, default, hu_window, threads)
        pair["fields"] = {}
        structures, t_pre = pair["structures"], pair["prealign_seconds"]
        f, m = pair["fixed"][None], pair["moving"][None]
        rows: dict[str, dict[str, Any]] = {}
        for name, fn in methods.items():
            fn(f, m)  # warm-up
            t0 = time.perf_counter()
            u = fn(f, m).float()
            seconds = time.perf_counter() - t0
            rows[name] = score_pair(pair, u, structures) | {"seconds": seconds, "prealign_seconds": t_pre}
            pair["fields"][name] = u
        results[spec.label()] = rows
        aligned.append(pair)
    return results, aligned


def real_pairs_table(results: dict[str, dict[str, dict[str, Any]]], structures: list[str]) -> dict[str, Any]:
    """The report table ``{title, note, header, rows}``: one row per method and pair, then per method the
    mean over pairs."""
    header = ["method", "pair", *[f"Dice {s}" for s in structures], "mean Dice", "HD95 mm",
              "% det J <= 0", "s / pair", "prealign s"]  # fmt: skip
    keys = [*[f"dice_{s}" for s in structures], "dice", "hd95_mm", "folding_percent", "seconds"]
    methods = list(next(iter(results.values()))) if results else []
    rows: list[list[object]] = []
    for method in methods:
        per = [results[p][method] for p in results]
        for pair, row in zip(results, per, strict=True):
            rows.append([method, pair, *[row[k] for k in keys], row["prealign_seconds"]])
        if len(per) > 1:
            mean = [float(np.nanmean([r[k] for r in per])) for k in keys]
            pre = float(np.mean([r["prealign_seconds"] for r in per]))
            rows.append([method, f"mean of {len(per)}", *mean, pre])
    return {"title": "Real inter-patient pairs", "header": header, "rows": rows}


def real_pairs_figure(aligned: list[dict[str, Any]], methods: list[str], out: Path) -> Path:
    """One axial slice per pair (the one with the most fixed label voxels): fixed, pre-aligned moving and
    the moving warped by each of ``methods``, with the fixed structures' outlines on every panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medistill.nets.registration import warp
    from medistill.report.figures import save_figure

    cols = 2 + len(methods)
    fig, ax = plt.subplots(len(aligned), cols, figsize=(2.4 * cols, 2.6 * len(aligned)), squeeze=False)
    for r, pair in enumerate(aligned):
        f, m, lab = pair["fixed"], pair["moving"], pair["fixed_labels"][0]
        z = int((lab > 0).sum((0, 1)).argmax())

        def view(a: np.ndarray, z: int = z) -> np.ndarray:
            return np.flipud(np.asarray(a)[..., z].T)  # anterior up for a RAS-ordered array

        panels = [("fixed", f[0]), ("moving (pre-aligned)", m[0])]
        panels += [(name, warp(m[None], pair["fields"][name])[0, 0]) for name in methods]
        for c, (title, img) in enumerate(panels):
            a = ax[r, c]
            a.imshow(view(img.numpy()), cmap="gray", vmin=0, vmax=1)
            a.contour(view(lab.numpy()), levels=np.arange(len(pair["structures"])) + 0.5, colors="r",
                      linewidths=0.4)  # fmt: skip
            a.set_title(title if r else f"{title}", fontsize=8)
            a.axis("off")
        ax[r, 0].set_title(f"{pair['name']}\nfixed", fontsize=8)
    fig.suptitle("real pairs: red = fixed structures' outlines", fontsize=8)
    return save_figure(fig, out)
