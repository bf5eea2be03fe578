"""The brain-only synthesis pair ``brain-mr <-> brain-ct`` (``data.pair: brain``): the MNI152 2009a T1 and
a brain CT atlas, both reduced to the brain and prepared once into the medistill cache.

Why a preparation step: the brain CT atlas (TotalSegmentator's ``ct_brain_atlas_1mm``) stores its
background as **0 HU**, not air, so the synthesis pipeline's CT checks (1st percentile near -1000) and
its body mask (HU > -500) would take the whole box for the body. Here:

* **CT**: brain mask = nonzero voxels, largest 3D component, holes filled in 3D and in every axial slice
  (internal CSF of exactly 0 HU stays inside); everything outside set to air (:data:`AIR_HU`); cropped to
  the mask's bounding box plus :data:`~medistill.tasks.brain_tissue.MARGIN_MM`, so both brains sit
  centred on the synthesis canvas.
* **MR**: the template ships brain-extracted already (zero outside its own, wider mask that keeps the
  outer CSF and dura); it is stripped again by the same brain mask as the registration's brain pair
  (:func:`medistill.tasks.brain_tissue.brain_mr_tissue`: GM + WM >= 0.5, closed by 5 mm, filled) and
  cropped the same way, so both sides end at the cortex.

The prepared pair is cached under ``<data root>/mr2ct_brain/<key>/`` (written in a temporary folder and
renamed, so it is complete or absent), ``key`` = sha256 of the input files, the settings and the source
of the preparation code: a changed input or a changed preparation makes a new entry, never a stale one.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from medistill.errors import MedistillError
from medistill.io.atomic import atomic_write_text, file_sha256
from medistill.io.axial import axial_axis
from medistill.io.images import Image, read_image, write_image
from medistill.tasks import brain_tissue
from medistill.tasks.synthesis_data import _largest_filled

#: HU written outside the brain mask of the brain CT (its file stores 0 HU there)
AIR_HU = -1000.0
#: HU display window of the brain pair's figures (the head pair's -1000..1500 shows a brain as one grey)
BRAIN_DISPLAY_HU = (-20.0, 100.0)
#: the prepared files inside a cache entry
MR_FILE, CT_FILE, INFO_FILE = "brain_mr.nii.gz", "brain_ct.nii.gz", "prepare.json"


class BrainPair(NamedTuple):
    """A prepared brain pair: the stripped MR (float32), the CT in HU with air outside (int16)."""

    mr: Path
    ct: Path
    key: str


def ct_brain_mask(hu: np.ndarray, slice_axis: int) -> np.ndarray:
    """Brain mask of a CT whose background is 0 HU: nonzero, largest component, holes filled in 3D and in
    every slice along ``slice_axis``."""
    return _largest_filled(np.asarray(hu) != 0, slice_axis)


def strip_brain_ct(ct: Image, src: Path | str = "brain CT") -> tuple[Image, np.ndarray]:
    """``ct`` with air (:data:`AIR_HU`) outside its brain mask, cropped to the mask's box plus margin;
    returns the image and the cropped mask."""
    if ct.ndim != 3:
        raise MedistillError(f"{src}: a {ct.ndim}D image; the brain pair needs a 3D brain CT")
    mask = ct_brain_mask(ct.array, axial_axis(ct.affine))
    if not mask.any():
        raise MedistillError(f"{src}: no nonzero voxel; expected a brain CT with a 0 HU background")
    cropped = brain_tissue._cropped(Image(ct.array.astype(np.float32), ct.affine), mask, mask, None)
    hu = np.where(cropped.mask, cropped.t1.array, AIR_HU).astype(np.float32)
    return Image(hu, cropped.t1.affine), cropped.mask


def scaled_to_volume(img: Image, mask: np.ndarray, target_ml: float) -> tuple[Image, float]:
    """``img`` with its voxels' size scaled isotropically (the affine only: no resampling, HU untouched) so
    that ``mask`` holds ``target_ml``; the mask's centroid stays where it was. Returns the image and the
    linear scale."""
    voxel_ml = abs(float(np.linalg.det(img.affine[:3, :3]))) / 1000.0
    scale = float((target_ml / (float(mask.sum()) * voxel_ml)) ** (1 / 3))
    centre = img.affine @ np.array([*np.argwhere(mask).mean(0), 1.0])
    affine = img.affine.copy()
    affine[:3, :3] *= scale
    affine[:3, 3] += centre[:3] - (affine @ np.array([*np.argwhere(mask).mean(0), 1.0]))[:3]
    return Image(img.array, affine), scale


def _settings() -> dict[str, float]:
    return {
        "air_hu": AIR_HU,
        "margin_mm": brain_tissue.MARGIN_MM,
        "closing_mm": brain_tissue.CLOSING_MM,
        "probability": brain_tissue.PROBABILITY,
        "ct_scaled_to_mr_brain_volume": True,
    }


def brain_pair_key(mr_files: Sequence[Path], ct_file: Path) -> str:
    """Cache key: the input files' sha256, the settings and the preparation code's source."""
    h = hashlib.sha256(json.dumps(_settings(), sort_keys=True).encode())
    for path in (*mr_files, ct_file):
        h.update(file_sha256(path).encode())
    for code in (strip_brain_ct, ct_brain_mask, _largest_filled, scaled_to_volume, build_brain_pair):
        h.update(inspect.getsource(code).encode())
    h.update(inspect.getsource(brain_tissue).encode())  # the MR's brain mask
    return h.hexdigest()[:20]


def build_brain_pair(mr_folder: Path, ct_file: Path, out: Path) -> dict[str, object]:
    """Write the stripped MR and CT into the folder ``out``; returns what is written to its info file."""
    mr = brain_tissue.brain_mr_tissue(mr_folder)
    ct, ct_mask = strip_brain_ct(read_image(ct_file), ct_file)
    native_ml = float(ct_mask.sum()) * abs(float(np.linalg.det(ct.affine[:3, :3]))) / 1000.0
    ct, scale = scaled_to_volume(ct, ct_mask, mr.volumes_ml()["brain"])
    write_image(mr.t1, out / MR_FILE, dtype=np.float32)
    write_image(ct, out / CT_FILE, dtype=np.int16)
    inside = ct.array[ct_mask]
    return {
        "mr_brain_ml": round(mr.volumes_ml()["brain"], 1),
        "ct_brain_ml_native": round(native_ml, 1),
        "ct_linear_scale": round(scale, 4),
        "ct_hu_in_brain_p1_p50_p99": [round(float(v), 1) for v in np.percentile(inside, [1, 50, 99])],
        "mr_shape": list(mr.t1.shape),
        "ct_shape": list(ct.shape),
        "settings": _settings(),
    }


def prepare_brain_pair(mr_folder: Path, ct_file: Path, root: Path) -> BrainPair:
    """The prepared pair from the cache ``root``, built there once (atomically) when missing.

    ``mr_folder`` holds the brain-mr set's T1, GM and WM maps (names from the example registry);
    ``ct_file`` is the brain CT (0 HU background)."""
    mr_files = [Path(mr_folder) / f for f in brain_tissue.brain_mr_files()]
    for path in (*mr_files, Path(ct_file)):
        if not path.is_file():
            raise MedistillError(
                f"{path}: missing input of the brain pair (run `medistill data fetch brain-mr brain-ct`)"
            )
    key = brain_pair_key(mr_files, Path(ct_file))
    folder = Path(root) / key
    pair = BrainPair(folder / MR_FILE, folder / CT_FILE, key)
    if all((folder / f).is_file() for f in (MR_FILE, CT_FILE, INFO_FILE)):
        return pair
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=folder.parent))
    try:
        info = build_brain_pair(Path(mr_folder), Path(ct_file), tmp)
        info["inputs"] = {p.name: file_sha256(p) for p in (*mr_files, Path(ct_file))}
        atomic_write_text(tmp / INFO_FILE, json.dumps(info, indent=2) + "\n")
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished the same entry first: keep theirs
            if not (folder / INFO_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return pair


def brain_pair_root() -> Path:
    """Where prepared brain pairs are cached: ``<data root>/mr2ct_brain``."""
    from medistill.io.examples import data_root

    return data_root() / "mr2ct_brain"


def brain_pair_sources() -> BrainPair:
    """The brain-mr and brain-ct example sets (fetched if needed), prepared and cached."""
    from medistill.io.examples import example_file, example_path

    return prepare_brain_pair(
        example_path("brain-mr"), example_file("brain-ct", "ct_brain_atlas_1mm.nii.gz"), brain_pair_root()
    )
