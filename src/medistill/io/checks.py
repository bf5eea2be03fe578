"""Checks at the I/O boundary that readers cannot make alone: "is this CT in HU?", "can I write there?".

Why here and not in each verb: a verb that needs Hounsfield units (metal simulation, DRRs, the CT
cohort, seg3d prediction) given an MR, a dose grid, a screen capture or a colour picture runs to the end
and writes plausible-looking nonsense with exit 0. One function, :func:`require_ct`, decides for all of
them: from the DICOM tags where the file has them (:attr:`~medistill.io.images.Image.modality`), else
from the values (CT in HU has air near -1000 and bone below ~3000). Likewise a bad output name should
fail before minutes of work, not after: :func:`check_output_path` / :func:`check_output_folder`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medistill.errors import MedistillError
from medistill.io.images import WRITE_SUFFIXES, Image, PathLike, read_image

IMAGE_SUFFIXES = WRITE_SUFFIXES  # .nii.gz .nii .mha .mhd .nrrd .png .tif .tiff

# What a refused DICOM modality is, in words (anything else not CT reads "a DICOM <Modality> image").
_NOT_CT = {
    "MR": "an MR image (no Hounsfield units)",
    "RTDOSE": "an RT dose grid (dose in Gy, not HU)",
    "PT": "a PET image (activity, not HU)",
    "NM": "a nuclear-medicine image (counts, not HU)",
    "US": "an ultrasound image",
    "CR": "a projection radiograph, not a CT",
    "DX": "a projection radiograph, not a CT",
    "MG": "a mammogram, not a CT",
    "XA": "an angiography projection, not a CT",
    "SC": "a secondary capture (a screen image: SOP class Secondary Capture, or DERIVED/SECONDARY "
    "without a rescale to HU)",
    "colour": "a colour image (a picture, not HU)",
}
# Values of CT in HU: air at -1000 (outside the body, lungs, bowel gas) and bone at most ~3000; a few
# metal voxels may exceed that, so the top is judged on the 99.9th percentile.
AIR_MIN_HU = -900.0
AIR_P1_HU = -500.0
TOP_P999_HU = 4000.0


def _describe(modality: str) -> str:
    return _NOT_CT.get(modality, f"a DICOM {modality} image, not CT")


def _hu_problem(array: np.ndarray) -> str | None:
    """Why these values are not CT in HU (None when they look like it)."""
    values = np.asarray(array).ravel()
    if values.size == 0:
        return "it has no voxels"
    sample = values[:: max(1, values.size // 1_000_000)].astype(np.float32)  # percentiles of ~1e6 voxels
    lo, hi = float(values.min()), float(values.max())
    p1, p999 = (float(v) for v in np.percentile(sample, [1.0, 99.9]))
    if lo > AIR_MIN_HU and p1 > AIR_P1_HU:
        return (
            f"values {lo:g} to {hi:g} (1st percentile {p1:g}) have no air (nothing at or below "
            f"{AIR_MIN_HU:g}, 1st percentile above {AIR_P1_HU:g})"
        )
    if p999 > TOP_P999_HU:
        return f"its 99.9th percentile is {p999:g}, above any tissue or bone in HU ({TOP_P999_HU:g})"
    return None


def require_ct(
    image: Image, what: str, assume_ct: bool = False, override: str | None = "--assume-ct"
) -> Image:
    """Return ``image`` if it is CT in HU; otherwise raise one line naming ``what`` and the reason.

    DICOM says what it is: Modality CT passes (a secondary capture does not, see
    :attr:`Image.modality`), any other modality fails. Formats without the tag (NIfTI, MHA, NRRD, grey
    PNG) are judged by their values: air (a minimum at or below -900 or a 1st percentile at or below
    -500) and a 99.9th percentile at or below 4000. Values need not be integers: resampled CT in float
    is common. ``assume_ct`` (the user's explicit flag, named by ``override`` in the message; None when
    the verb has none) skips every check but colour, which can never be HU.
    """
    modality = image.modality
    if modality == "colour":
        raise MedistillError(f"{what}: {_describe(modality)}; this needs a grey-scale CT in HU")
    if assume_ct or modality == "CT":
        return image
    if modality is not None:
        raise MedistillError(f"{what}: {_describe(modality)}; this needs CT in Hounsfield units")
    problem = _hu_problem(image.array)
    if problem is None:
        return image
    hint = (
        f"if it is CT in HU all the same (e.g. a tight crop without air), pass {override}"
        if override
        else "convert it to CT in HU first"
    )
    raise MedistillError(
        f"{what}: does not look like CT in HU: {problem} (an MR, a dose grid, or CT stored without "
        f"its -1024 offset?); {hint}"
    )


def read_ct(path: PathLike, assume_ct: bool = False, override: str | None = "--assume-ct") -> Image:
    """:func:`~medistill.io.images.read_image` for inputs that must be CT in HU (see :func:`require_ct`)."""
    return require_ct(read_image(path), str(path), assume_ct, override)


def _check_not_input(path: Path, what: str, inputs: Sequence[PathLike]) -> None:
    for source in inputs:
        src = Path(source)
        if path.exists() and src.exists():
            same = os.path.samefile(path, src)
        else:
            same = path.resolve() == src.resolve()
        if same:
            raise MedistillError(f"{what} {path} is the input {src}; medistill never overwrites inputs")


def _check_writable(folder: Path, what: str, path: Path) -> None:
    """The nearest existing folder at or above ``folder`` lets us create ``path`` there."""
    place = folder
    while not place.exists():
        place = place.parent
    if not place.is_dir():
        raise MedistillError(f"{what} {path}: {place} is a file, so the folder cannot be created")
    if not os.access(place, os.W_OK | os.X_OK):
        raise MedistillError(f"{what} {path}: no permission to write in {place}")


def check_output_path(
    path: PathLike,
    kinds: Sequence[str] = IMAGE_SUFFIXES,
    inputs: Sequence[PathLike] = (),
    what: str = "--out",
) -> Path:
    """Check an output file before any work: a known ending (``kinds``), not an input, a writable place.

    ``kinds`` are file endings such as ``.nii.gz`` (case-insensitive); ``inputs`` the files or folders
    the command reads. Returns ``path`` as a :class:`Path`.
    """
    path = Path(path)
    if not path.name.lower().endswith(tuple(k.lower() for k in kinds)):
        shown = "".join(path.suffixes[-2:]) or "(no extension)"
        raise MedistillError(f"{what} {path}: unknown output format {shown}; use one of {', '.join(kinds)}")
    if path.is_dir():
        raise MedistillError(f"{what} {path} is a folder; give a file name such as pred{kinds[0]}")
    _check_not_input(path, what, inputs)
    _check_writable(path.parent, what, path)
    return path


def check_output_folder(path: PathLike, inputs: Sequence[PathLike] = (), what: str = "--out") -> Path:
    """Check an output folder before any work: not a file, not one of the ``inputs``, writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MedistillError(f"{what} {path} is a file; this writes a folder")
    _check_not_input(path, what, inputs)
    _check_writable(path, what, path)
    return path
