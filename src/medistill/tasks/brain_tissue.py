"""Skull-stripped T1 and grey/white-matter label maps of the two brain example sets.

A real brain pair is scored by GM/WM overlap, and an MR network must not be rewarded for aligning skull
and scalp, so both sides of ``brain-mr <-> head-mr`` get the same treatment: a **brain mask** (a tissue
mask closed by :data:`CLOSING_MM` and filled in 3D and slice by slice, so white matter, ventricles and the
basal cisterns are inside), the T1 multiplied by it, and a label map ``0`` (outside / CSF), ``1`` GM,
``2`` WM, cropped to the mask's bounding box plus :data:`MARGIN_MM` (the network grid then spans the brain,
not the empty box around it).

* ``brain-mr`` (MNI152 2009a, an average of 152 people): GM / WM from its probability maps (stored as
  uint8 0..255, i.e. probability x 255) at >= 0.5; the tissue mask is GM + WM >= 0.5. The template's T1
  ships already brain-extracted (zero outside its own, wider brain mask); ours removes the outer CSF and
  dura that mask keeps, so both sides end at the same distance from the cortex.
* ``head-mr`` (Colin27: one person, 27 scans averaged, with skull and scalp): no tissue maps ship. The
  tissue mask is its AAL atlas > 0 (cortical, subcortical and cerebellar grey matter drawn on this very
  brain); GM / WM are a three-class **multi-Otsu** classification (CSF / GM / WM, maximal between-class
  variance of the 256-bin histogram) of the T1 inside the brain mask. The AAL has no brain stem, so
  head-mr's mask stops at the pons where brain-mr's WM map goes on (a few tens of ml).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy import ndimage

from medistill.errors import MedistillError
from medistill.io.images import Image, PathLike, check_same_grid, read_image

GM, WM = 1, 2
#: closing radius of the tissue mask (mm): bridges sulci and the gaps between AAL regions
CLOSING_MM = 5.0
#: margin kept around the brain mask's bounding box when cropping (mm)
MARGIN_MM = 5.0
#: probability threshold of the brain-mr GM / WM maps
PROBABILITY = 0.5


class BrainTissue(NamedTuple):
    """One brain example set, skull-stripped, on a grid cropped to the brain.

    Attributes:
        t1: T1 intensities inside the brain mask, 0 outside (the file's values, float32).
        labels: ``0`` outside the brain or CSF, :data:`GM`, :data:`WM` (int16), on ``t1``'s grid.
        mask: the brain mask (bool) on ``t1``'s grid.
        thresholds: the (CSF/GM, GM/WM) intensity thresholds of an intensity classification, or None
            where the labels come from probability maps.
    """

    t1: Image
    labels: Image
    mask: np.ndarray
    thresholds: tuple[float, float] | None

    def volumes_ml(self) -> dict[str, float]:
        """Brain mask, GM and WM volumes in millilitres."""
        voxel_ml = abs(float(np.linalg.det(self.t1.affine[:3, :3]))) / 1000.0
        return {
            "brain": float(self.mask.sum()) * voxel_ml,
            "GM": float((self.labels.array == GM).sum()) * voxel_ml,
            "WM": float((self.labels.array == WM).sum()) * voxel_ml,
        }


def brain_mask(
    tissue: np.ndarray, spacing_mm: tuple[float, ...], closing_mm: float = CLOSING_MM
) -> np.ndarray:
    """A brain mask from a tissue mask: closed by ``closing_mm`` (dilation then erosion, both through
    Euclidean distance maps in mm, so the radius is isotropic on any spacing), then holes filled in 3D
    and in every slice along each array axis. The slice fills are needed because the cavities the closing
    leaves (ventricles, deep WM under an AAL-style GM mask) open to the outside through the brain stem
    and the cisterns, so a 3D fill alone leaves them out."""
    if not tissue.any():
        raise MedistillError("brain_mask: the tissue mask is empty")
    tissue = np.asarray(tissue, bool)
    # work in the tissue's bounding box, padded by room for the dilation (half the cost on the templates)
    pad = int(np.ceil(closing_mm / min(spacing_mm))) + 1
    where = np.argwhere(tissue)
    box = tuple(slice(a, b + 1) for a, b in zip(where.min(0), where.max(0), strict=True))
    padded = np.pad(tissue[box], pad)
    dilated = ndimage.distance_transform_edt(~padded, sampling=spacing_mm) <= closing_mm
    closed = ndimage.distance_transform_edt(dilated, sampling=spacing_mm) > closing_mm
    closed = closed[(slice(pad, -pad),) * 3] | tissue[box]
    filled = ndimage.binary_fill_holes(closed)
    for axis in range(3):
        structure = np.zeros((3, 3, 3), bool)
        index = [slice(None)] * 3
        index[axis] = 1
        structure[tuple(index)] = ndimage.generate_binary_structure(2, 1)  # in-slice 4-connectivity
        filled |= ndimage.binary_fill_holes(closed, structure=structure)
    mask = np.zeros_like(tissue)
    mask[box] = filled
    return mask


def multi_otsu(values: np.ndarray, bins: int = 256) -> tuple[float, float]:
    """The two thresholds splitting ``values`` into three classes of maximal between-class variance
    (Otsu's criterion over every pair of histogram bin edges); a class starts at its threshold."""
    values = np.asarray(values, np.float64).ravel()
    if values.size < 3 or values.min() == values.max():
        raise MedistillError("multi_otsu: need at least 3 values that are not all equal")
    hist, edges = np.histogram(values, bins)
    centres = (edges[:-1] + edges[1:]) / 2
    p = hist / hist.sum()
    w, mu = np.cumsum(p), np.cumsum(p * centres)  # class weight and mass of bins [0, i)
    # classes [0, i), [i, j), [j, bins): sum of w_k mu_k^2 is maximal where the between-class variance is
    i, j = np.triu_indices(bins, 1)
    keep = i > 0
    i, j = i[keep], j[keep]
    w0, m0 = w[i - 1], mu[i - 1]
    w1, m1 = w[j - 1] - w0, mu[j - 1] - m0
    w2, m2 = 1.0 - w[j - 1], mu[-1] - mu[j - 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        score = sum(np.where(wk > 0, mk**2 / wk, 0.0) for wk, mk in ((w0, m0), (w1, m1), (w2, m2)))
    best = int(np.argmax(score))
    return float(edges[i[best]]), float(edges[j[best]])


def _cropped(
    t1: Image, labels: np.ndarray, mask: np.ndarray, thresholds: tuple[float, float] | None
) -> BrainTissue:
    """Strip (zero outside ``mask``) and crop everything to the mask's box plus :data:`MARGIN_MM`."""
    spacing = np.asarray(t1.spacing)
    margin = np.ceil(MARGIN_MM / spacing).astype(int)
    where = np.argwhere(mask)
    lo = np.maximum(where.min(0) - margin, 0)
    hi = np.minimum(where.max(0) + margin + 1, mask.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    affine = t1.affine.copy()
    affine[:3, 3] = t1.affine[:3, :3] @ lo + t1.affine[:3, 3]
    stripped = np.where(mask, t1.array, 0).astype(np.float32)[box]
    lab = np.where(mask, labels, 0).astype(np.int16)[box]
    return BrainTissue(Image(stripped, affine), Image(lab, affine), mask[box], thresholds)


def brain_mr_files() -> tuple[str, str, str]:
    """File names of the brain-mr set's T1, GM and WM maps (from the example registry)."""
    from medistill.io.examples import get

    files = get("brain-mr").files
    t1, gm, wm = (next(f for f in files if key in f) for key in ("_t1_", "_gm_", "_wm_"))
    return t1, gm, wm


def brain_mr_tissue(folder: PathLike) -> BrainTissue:
    """MNI152 2009a: GM / WM from the probability maps (>= :data:`PROBABILITY`), skull-stripped T1."""
    folder = Path(folder)
    t1_name, gm_name, wm_name = brain_mr_files()
    t1, gm, wm = (read_image(folder / f) for f in (t1_name, gm_name, wm_name))
    check_same_grid(t1, gm, t1_name, gm_name)
    check_same_grid(t1, wm, t1_name, wm_name)
    # the maps are probability x 255 in uint8 (a float map in [0, 1] is taken as it is)
    scale = 255.0 if max(gm.array.max(), wm.array.max()) > 1.0 else 1.0
    p_gm, p_wm = gm.array.astype(np.float32) / scale, wm.array.astype(np.float32) / scale
    labels = np.where(
        (p_gm >= PROBABILITY) & (p_gm >= p_wm), GM, np.where(p_wm >= PROBABILITY, WM, 0)
    ).astype(np.int16)
    mask = brain_mask((p_gm + p_wm) >= PROBABILITY, t1.spacing)
    return _cropped(Image(t1.array.astype(np.float32), t1.affine), labels, mask, None)


def head_mr_tissue(folder: PathLike) -> BrainTissue:
    """Colin27: brain mask from the AAL atlas, GM / WM by a three-class multi-Otsu of the T1 inside it,
    skull and scalp stripped."""
    from medistill.io.example_formats import load_head_mr

    t1, aal, _ = load_head_mr(folder)
    mask = brain_mask(aal.array > 0, t1.spacing)
    low, high = multi_otsu(t1.array[mask])
    labels = np.where(mask & (t1.array >= high), WM, np.where(mask & (t1.array >= low), GM, 0))
    return _cropped(t1, labels, mask, (low, high))


#: example set -> its tissue builder
BRAIN_EXAMPLES = {"brain-mr": brain_mr_tissue, "head-mr": head_mr_tissue}


def load_brain_tissue(example: str) -> BrainTissue:
    """The skull-stripped T1 and GM/WM labels of example set ``example`` (fetched first if needed)."""
    from medistill.io.examples import example_path

    if example not in BRAIN_EXAMPLES:
        raise MedistillError(f"example {example!r}: no GM/WM maps; brain examples are {list(BRAIN_EXAMPLES)}")
    return BRAIN_EXAMPLES[example](example_path(example))
