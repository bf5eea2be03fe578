"""The one in-memory image type, :class:`Image`, and its readers and writers.

Conventions (stated here once; every other module relies on them and converts at the edge only):

* **World** coordinates are RAS+ millimetres, the nibabel convention: +x towards the patient's Right,
  +y Anterior, +z Superior. ITK and DICOM use LPS+; we convert LPS -> RAS when reading and RAS -> LPS
  when writing by negating the first two rows of the affine, and nowhere else.
* **3D arrays** are in NIfTI voxel order: exactly what nibabel's ``get_fdata()`` returns, so array
  axis ``k`` is affine column ``k``. SimpleITK arrays come as ``(z, y, x)`` and are transposed to
  ``(x, y, z)``; DICOM slice stacks likewise (columns, rows, slices).
* **2D arrays** (PNG/TIFF, a single DICOM radiograph or slice, 2D MHA/NRRD) are ``(rows, cols)``:
  axis 0 runs over rows top->bottom, axis 1 over columns left->right, as a viewer shows them. The 4x4
  affine's column 0 is the row step (unit direction x row spacing), column 1 the column step, column 2
  the slice normal. For a DICOM slice these come from ImageOrientationPatient/ImagePositionPatient;
  without patient orientation (PNG, most CR radiographs) the direction is the identity and the origin 0.
* ``affine`` maps ``(i, j, k, 1)`` (voxel index, ``k = 0`` for 2D) to world mm; ``spacing`` is the
  norm of each used column.
* **Values**: readers return stored values with the DICOM modality LUT applied (CT -> float32 HU).
  :func:`read_radiograph` additionally makes "higher = more attenuation" (MONOCHROME1 is inverted).
  NaN or infinite voxels are refused on reading (downstream they become empty masks without an error).
  :attr:`Image.modality` keeps what the file says the values are (the DICOM Modality, "SC" for a
  secondary capture, "colour" for a colour PNG/TIFF); :func:`medistill.io.checks.require_ct` uses it.
* **DICOM series** are checked before they are stacked: slices are placed by projecting
  ImagePositionPatient on the slice normal (from ImageOrientationPatient). Files at the same position are
  dropped with a warning when their pixels are identical (a copied file) and refused otherwise; a gap
  (missing slice) or non-uniform spacing is refused, naming the folder and the positions, because ITK
  would stack such a series as uniform (e.g. 1.67 mm instead of 2.5, slices misplaced by millimetres).
* **Channels** are not part of :class:`Image`; :func:`write_channels` / :func:`read_channels` store them
  as a 4D NIfTI with channels last (the Medical Segmentation Decathlon layout).

Libraries: nibabel for NIfTI, SimpleITK for MHA/MHD/NRRD and DICOM series (GDCM decodes compressed
transfer syntaxes), pydicom for single DICOM files, Pillow for PNG/TIFF. PNG/TIFF keep no world
geometry of their own, so :func:`write_image` stores the affine as a text chunk (PNG) or image
description (TIFF) that :func:`read_image` reads back; other programs ignore it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import nibabel as nib
import numpy as np
import pydicom
import SimpleITK as sitk
from PIL import Image as PILImage
from PIL import PngImagePlugin

from medistill.errors import MedistillError
from medistill.io.atomic import atomic_path

PathLike = str | os.PathLike[str]

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".mha", ".mhd", ".nrrd")
RASTER_SUFFIXES = (".png", ".tif", ".tiff")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
READ_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES + RASTER_SUFFIXES + DICOM_SUFFIXES
WRITE_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES + RASTER_SUFFIXES

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_AFFINE_KEY = "medistill.affine"

# DICOM objects that carry no image to read (or an image that is not a picture of the patient).
_NON_IMAGE_MODALITIES = {"SEG", "RTSTRUCT", "RTPLAN", "RTRECORD", "SR", "PR", "KO", "REG", "DOC", "FID"}
_NON_IMAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation",
    "1.2.840.10008.5.1.4.1.1.481.3": "RT Structure Set",
    "1.2.840.10008.5.1.4.1.1.481.5": "RT Plan",
    "1.2.840.10008.5.1.4.1.1.66.1": "Spatial Registration",
    "1.2.840.10008.5.1.4.1.1.66.3": "Deformable Spatial Registration",
    "1.2.840.10008.5.1.4.1.1.104.1": "Encapsulated PDF",
}
_NON_IMAGE_SOP_PREFIXES = {
    "1.2.840.10008.5.1.4.1.1.88.": "Structured Report",
    "1.2.840.10008.5.1.4.1.1.11.": "Presentation State",
}
# Secondary Capture image storage (single- and multi-frame): screen grabs whose pixels are not HU
_SECONDARY_CAPTURE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.7",
    "1.2.840.10008.5.1.4.1.1.7.1",
    "1.2.840.10008.5.1.4.1.1.7.2",
    "1.2.840.10008.5.1.4.1.1.7.3",
    "1.2.840.10008.5.1.4.1.1.7.4",
}
_COLOUR_PHOTOMETRIC = ("RGB", "YBR", "PALETTE", "ARGB", "CMYK", "HSV")
# slices closer than this along the normal are "at the same position" (IPP is written to ~1e-3 mm)
_SAME_POSITION_MM = 0.01
# a step may differ from the series' spacing by this fraction (float jitter of exported positions)
_SPACING_REL_TOL = 0.01


@dataclass(eq=False)
class Image:
    """A 2D or 3D scalar image on a world grid.

    Attributes:
        array: spatial axes only (2 or 3 of them); axis ``k`` steps along affine column ``k``.
        affine: ``(4, 4)`` float64, voxel index ``(i, j, k, 1)`` -> world mm in RAS+.
        modality: what the file says the values are, where it says so: the DICOM Modality ("CT", "MR",
            "RTDOSE", "CR", ...), "SC" for a DICOM secondary capture (or a derived/secondary CT image
            without a rescale to HU), "colour" for a colour PNG/TIFF read as grey; None for formats
            without such a tag (NIfTI, MHA/NRRD, grey PNG/TIFF) and for arrays made in memory. It is
            not carried over by :meth:`with_array`: a prediction on a CT's grid is not a CT.
    """

    array: np.ndarray
    affine: np.ndarray
    modality: str | None = None

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.array.ndim not in (2, 3):
            raise MedistillError(
                f"Image: array must have 2 or 3 spatial axes, got shape {self.array.shape} "
                "(channels are stored with write_channels, not in Image)"
            )
        if self.affine.shape != (4, 4):
            raise MedistillError(f"Image: affine must be 4x4, got shape {self.affine.shape}")
        if not np.all(np.isfinite(self.affine)):
            raise MedistillError("Image: affine contains NaN or infinity")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.array.shape)

    @property
    def ndim(self) -> int:
        return int(self.array.ndim)

    @property
    def spacing(self) -> tuple[float, ...]:
        """Millimetres per step along each array axis (norms of the affine's columns)."""
        norms = np.linalg.norm(self.affine[:3, : self.ndim], axis=0)
        return tuple(float(n) for n in norms)

    @property
    def origin(self) -> tuple[float, float, float]:
        """World position (RAS+ mm) of voxel 0."""
        return tuple(float(v) for v in self.affine[:3, 3])  # type: ignore[return-value]

    @property
    def direction(self) -> np.ndarray:
        """``(3, 3)`` matrix whose columns are the unit world directions of the array axes."""
        cols = self.affine[:3, :3]
        norms = np.linalg.norm(cols, axis=0)
        return cols / np.where(norms > 0, norms, 1.0)

    def with_array(self, array: np.ndarray) -> Image:
        """A new image on the same grid (e.g. a prediction for this image); shapes must agree."""
        array = np.asarray(array)
        if array.shape != self.array.shape:
            raise MedistillError(f"with_array: shape {array.shape} differs from the grid {self.shape}")
        return Image(array, self.affine.copy())


# --------------------------------------------------------------------------------------------- helpers


def _check_finite(image: Image, path: Path, values: np.ndarray | None = None) -> Image:
    """Refuse NaN or infinite voxels (of ``values``, default the image's array) in one line.

    Downstream they poison every mean and comparison: a segmentation of a NaN volume comes out empty
    and the verb still exits 0, so the reader stops them where the file is named.
    """
    array = image.array if values is None else values
    if np.issubdtype(array.dtype, np.inexact) and not np.isfinite(array).all():
        nan = int(np.isnan(array).sum())
        inf = int(np.isinf(array).sum())
        raise MedistillError(
            f"{path}: {nan + inf} of {array.size} voxels are not finite ({nan} NaN, {inf} infinite); "
            "replace them (e.g. by the background value) before using the image"
        )
    return image


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in READ_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def _require_exists(path: Path) -> None:
    if not path.exists():
        raise MedistillError(f"{path}: file not found")


def _affine_2d_default(spacing: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    return np.diag([spacing[0], spacing[1], 1.0, 1.0])


def _is_dicom_file(path: Path) -> bool:
    """True when the file has the DICOM preamble ('DICM' at byte 128)."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------- NIfTI


def _load_nifti(path: Path) -> nib.Nifti1Image:
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for bad headers
        raise MedistillError(f"{path}: not a readable NIfTI file ({exc})") from exc
    return img  # type: ignore[return-value]


def _nifti_data(path: Path, img: Any) -> np.ndarray:
    try:
        # Unscaled data keeps its stored dtype (label maps stay integer; get_fdata would give float64).
        # Scaled data (e.g. int16 with scl_inter -1024 for HU) becomes float32, which holds it exactly
        # at half the memory of nibabel's float64. The voxel order is get_fdata's either way.
        proxy = img.dataobj
        scaled = float(getattr(proxy, "slope", 1.0)) != 1.0 or float(getattr(proxy, "inter", 0.0)) != 0.0
        stored = img.get_data_dtype()
        if scaled and np.issubdtype(stored, np.integer) and stored.itemsize <= 2:
            return img.get_fdata(dtype=np.float32)
        return np.asanyarray(proxy)
    except (EOFError, OSError, zlib.error, ValueError) as exc:
        raise MedistillError(f"{path}: NIfTI data is truncated or corrupt ({exc})") from exc


def _read_nifti(path: Path) -> Image:
    img = _load_nifti(path)
    data = _nifti_data(path, img)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim > 3:
        raise MedistillError(
            f"{path}: NIfTI has shape {data.shape} with {data.shape[3]} channels; "
            "read it with read_channels (one Image per channel)"
        )
    return Image(data, img.affine)


def _nifti_ready(array: np.ndarray) -> np.ndarray:
    """Map dtypes NIfTI cannot store (bool, int64 that fits) to ones it can."""
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if array.dtype == np.int64 and array.size and array.min() >= -(2**31) and array.max() < 2**31:
        return array.astype(np.int32)
    return array


def _write_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(_nifti_ready(array), affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


def write_channels(arrays: list[np.ndarray], affine: np.ndarray, path: PathLike) -> None:
    """Write same-shape channel arrays as one 4D NIfTI, channels last (the MSD multi-modal layout)."""
    path = Path(path)
    if not arrays:
        raise MedistillError(f"{path}: write_channels needs at least one channel")
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise MedistillError(f"{path}: channels have different shapes {sorted(shapes)}")
    if len(next(iter(shapes))) != 3:
        # a stack of 2D channels would read back as one 3D volume: keep 2D channels as separate files
        raise MedistillError(f"{path}: write_channels stores 3D channels; got shape {next(iter(shapes))}")
    if not path.name.lower().endswith(NIFTI_SUFFIXES):
        raise MedistillError(f"{path}: channels are written as NIfTI; use a .nii.gz name")
    _write_nifti(np.stack([np.asarray(a) for a in arrays], axis=-1), np.asarray(affine, float), path)


def read_channels(path: PathLike) -> list[Image]:
    """Read every channel of an image file: one :class:`Image` per channel of a 4D NIfTI, else one."""
    path = Path(path)
    _require_exists(path)
    if not path.name.lower().endswith(NIFTI_SUFFIXES):
        return [read_image(path)]
    img = _load_nifti(path)
    data = _nifti_data(path, img)
    if data.ndim <= 3:
        return [_check_finite(Image(data, img.affine), path)]
    if data.ndim > 4:
        raise MedistillError(f"{path}: NIfTI has {data.ndim} axes; expected 3 spatial + 1 channel axis")
    _check_finite(Image(data[..., 0], img.affine), path, np.asarray(data))
    return [Image(np.ascontiguousarray(data[..., c]), img.affine) for c in range(data.shape[3])]


# --------------------------------------------------------------------------------------- SimpleITK side


def _itk_axis_order(ndim: int) -> list[int]:
    """ITK axis for each of our array axes: 3D keeps (x, y, z); 2D rows are ITK y, columns ITK x."""
    return [0, 1, 2] if ndim == 3 else [1, 0]


def _itk_affine(
    direction: tuple[float, ...], spacing: tuple[float, ...], origin: tuple[float, ...]
) -> np.ndarray:
    """RAS affine for our axis order from ITK's (LPS) direction, spacing and origin."""
    dim = len(spacing)
    d = np.asarray(direction, float).reshape(dim, dim)
    lps = np.eye(4)
    for our_axis, itk_axis in enumerate(_itk_axis_order(dim)):
        lps[:dim, our_axis] = d[:, itk_axis] * spacing[itk_axis]
    lps[:dim, 3] = origin
    return _LPS_TO_RAS @ lps


def _check_itk_layout(dim: int, components: int, path: Path) -> None:
    if components != 1:
        raise MedistillError(
            f"{path}: has {components} components per pixel; medistill reads scalar images "
            "(store channels as separate files or a 4D NIfTI)"
        )
    if dim not in (2, 3):
        raise MedistillError(f"{path}: {dim}D image; medistill reads 2D and 3D images")


def _from_sitk(img: sitk.Image, path: Path) -> Image:
    if img.GetDimension() == 4 and img.GetSize()[3] == 1:
        img = img[:, :, :, 0]
    dim = img.GetDimension()
    _check_itk_layout(dim, img.GetNumberOfComponentsPerPixel(), path)
    arr = sitk.GetArrayFromImage(img)
    array = arr.transpose(2, 1, 0) if dim == 3 else arr
    affine = _itk_affine(img.GetDirection(), img.GetSpacing(), img.GetOrigin())
    return Image(np.ascontiguousarray(array), affine)


def _to_sitk(image: Image, path: Path) -> sitk.Image:
    lps = _LPS_TO_RAS @ image.affine
    dim = image.ndim
    if dim == 2 and (np.abs(lps[2, :2]).max() > 1e-6 or abs(lps[2, 3]) > 1e-6):
        raise MedistillError(
            f"{path}: this 2D image has an orientation or position outside the z=0 plane, which "
            "2D MHA/NRRD cannot store "
            "(write .nii.gz to keep its geometry)"
        )
    order = _itk_axis_order(dim)
    spacing = [0.0] * dim
    direction = np.eye(dim)
    for our_axis, itk_axis in enumerate(order):
        col = lps[:dim, our_axis]
        spacing[itk_axis] = float(np.linalg.norm(col))
        if spacing[itk_axis] == 0:
            raise MedistillError(f"{path}: affine column {our_axis} is zero (no spacing)")
        direction[:, itk_axis] = col / spacing[itk_axis]
    if not np.allclose(direction.T @ direction, np.eye(dim), atol=1e-4):
        raise MedistillError(f"{path}: affine has shear; MHA/NRRD need orthogonal axes (write .nii.gz)")
    arr = image.array
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    itk = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0) if dim == 3 else arr))
    itk.SetSpacing(spacing)
    itk.SetDirection(direction.flatten().tolist())
    itk.SetOrigin(lps[:dim, 3].tolist())
    return itk


def _read_itk(path: Path) -> Image:
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise MedistillError(f"{path}: not a readable image ({str(exc).strip().splitlines()[-1]})") from exc
    return _from_sitk(img, path)


def _write_itk(image: Image, path: Path) -> None:
    itk = _to_sitk(image, path)
    if path.name.lower().endswith(".mhd"):
        # .mhd keeps its voxels in a separate .raw named inside the header: write both under the final
        # names in a private folder, then move the data first and the header last.
        path.parent.mkdir(parents=True, exist_ok=True)
        tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.stem}.", dir=path.parent))
        try:
            sitk.WriteImage(itk, str(tmpdir / path.name), False)
            for part in sorted(tmpdir.iterdir(), key=lambda p: p.suffix.lower() == ".mhd"):
                os.replace(part, path.parent / part.name)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
        return
    with atomic_path(path) as tmp:
        sitk.WriteImage(itk, str(tmp), True)


# ----------------------------------------------------------------------------------------------- DICOM


def _check_dicom_kind(ds: pydicom.Dataset, path: Path) -> None:
    sop = str(ds.get("SOPClassUID", ""))
    kind = _NON_IMAGE_SOP_CLASSES.get(sop)
    if kind is None:
        kind = next((name for pre, name in _NON_IMAGE_SOP_PREFIXES.items() if sop.startswith(pre)), None)
    modality = str(ds.get("Modality", "")).upper()
    if kind is None and modality in _NON_IMAGE_MODALITIES:
        kind = f"Modality {modality}"
    if kind is not None:
        raise MedistillError(
            f"{path}: DICOM {kind} object (SOPClassUID {sop or '?'}, Modality {modality or '?'}), "
            "not an image; point medistill at the image series instead"
        )
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise MedistillError(f"{path}: DICOM file has no pixel data")
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples > 1 or photometric.startswith(_COLOUR_PHOTOMETRIC):
        raise MedistillError(
            f"{path}: colour DICOM (PhotometricInterpretation {photometric or '?'}, {samples} samples "
            "per pixel); medistill reads grey-scale images (CT, MR, radiographs), not screenshots"
        )


def _dicom_modality(ds: pydicom.Dataset) -> str | None:
    """What the values of this DICOM image are (:attr:`Image.modality`): Modality, or "SC" for captures.

    A secondary capture keeps the Modality of the scan it shows (often "CT") but its pixels are display
    values, so the SOP class wins; a CT image marked DERIVED and SECONDARY without a RescaleIntercept
    (a screen grab stored as CT) is a capture too. A derived CT *with* a rescale (an MPR) stays "CT".
    """
    if str(ds.get("SOPClassUID", "")) in _SECONDARY_CAPTURE_SOP_CLASSES:
        return "SC"
    modality = str(ds.get("Modality", "")).upper() or None
    image_type = {str(v).upper() for v in (ds.get("ImageType") or [])}
    if modality == "CT" and {"DERIVED", "SECONDARY"} <= image_type and "RescaleIntercept" not in ds:
        return "SC"
    return modality


def _dcmread(path: Path, header_only: bool = False) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(str(path), stop_before_pixels=header_only)
    except Exception as exc:  # InvalidDicomError, EOF, struct errors on truncated files
        raise MedistillError(f"{path}: not a readable DICOM file ({exc})") from exc


def _modality_lut(ds: pydicom.Dataset, pixels: np.ndarray) -> np.ndarray:
    """Apply RescaleSlope/Intercept; CT (HU) and any real rescale give float32."""
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    if slope != 1.0 or intercept != 0.0 or str(ds.get("Modality", "")).upper() == "CT":
        return pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    return pixels


def _dicom_spacing(ds: pydicom.Dataset) -> tuple[float, float] | None:
    """(row spacing, column spacing) in mm from PixelSpacing, else ImagerPixelSpacing; zeros mean none."""
    for key in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(key)
        if value is not None and len(value) == 2:
            rs, cs = float(value[0]), float(value[1])
            if rs > 0 and cs > 0:
                return rs, cs
    return None


def _dicom_slice_affine(ds: pydicom.Dataset, spacing: tuple[float, float]) -> np.ndarray:
    """RAS affine of a (rows, cols) slice: column 0 = row step, column 1 = column step."""
    iop = ds.get("ImageOrientationPatient")
    ipp = ds.get("ImagePositionPatient")
    if iop is None or len(iop) != 6:
        return _affine_2d_default(spacing)
    along_row = np.asarray(iop[:3], float)  # direction in which the column index grows
    along_col = np.asarray(iop[3:], float)  # direction in which the row index grows
    lps = np.eye(4)
    lps[:3, 0] = along_col * spacing[0]
    lps[:3, 1] = along_row * spacing[1]
    lps[:3, 2] = np.cross(along_row, along_col) * float(ds.get("SliceThickness", 1.0) or 1.0)
    if ipp is not None and len(ipp) == 3:
        lps[:3, 3] = np.asarray(ipp, float)
    return _LPS_TO_RAS @ lps


def _read_dicom_file(path: Path, ds: pydicom.Dataset | None = None) -> Image:
    ds = _dcmread(path) if ds is None else ds
    _check_dicom_kind(ds, path)
    modality = _dicom_modality(ds)
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        image = _read_itk(path)  # multi-frame: let GDCM assemble the volume and its geometry
        image.modality = modality
        return image
    try:
        pixels = ds.pixel_array
    except Exception as exc:
        try:  # compressed transfer syntaxes pydicom cannot decode without plugins: GDCM can
            image = _read_itk(path)
        except MedistillError:
            raise MedistillError(f"{path}: cannot decode DICOM pixel data ({exc})") from exc
        image.modality = modality
        return image
    if pixels.ndim != 2:
        raise MedistillError(f"{path}: DICOM pixel data has shape {pixels.shape}; expected one scalar slice")
    spacing = _dicom_spacing(ds) or (1.0, 1.0)
    return Image(_modality_lut(ds, pixels), _dicom_slice_affine(ds, spacing), modality)


def _fmt_mm(value: float) -> str:
    return f"{value:.3f}".rstrip("0").rstrip(".")


class _Slice(NamedTuple):
    name: str
    orientation: np.ndarray  # ImageOrientationPatient, 6 direction cosines (LPS)
    position: np.ndarray  # ImagePositionPatient, mm (LPS)
    size: tuple[object, object]  # (Rows, Columns)


def _order_series(folder: Path, files: list[str]) -> tuple[list[str], np.ndarray | None]:
    """The series' files in slice order and the LPS step (mm) between slices; refuses a broken series.

    Positions are ImagePositionPatient projected on the slice normal (the cross product of the two
    ImageOrientationPatient directions), so an oblique series sorts like an axial one. Returns the step
    vector ``(ipp_last - ipp_first) / (n - 1)`` (None for one slice) that becomes affine column 2.
    """
    if len(files) == 1:
        return files, None
    slices, uid = [], ""
    for name in files:
        ds = _dcmread(Path(name), header_only=True)
        uid = uid or str(ds.get("SeriesInstanceUID", ""))
        iop, ipp = ds.get("ImageOrientationPatient"), ds.get("ImagePositionPatient")
        if iop is None or len(iop) != 6 or ipp is None or len(ipp) != 3:
            raise MedistillError(
                f"{folder}: series {uid}: {Path(name).name} has no ImagePositionPatient/"
                "ImageOrientationPatient, so its slices cannot be placed"
            )
        size = (ds.get("Rows"), ds.get("Columns"))
        slices.append(_Slice(name, np.asarray(iop, float), np.asarray(ipp, float), size))
    label = f"{folder}: series {uid}"
    first = slices[0]
    for other in slices[1:]:
        pair = f"{Path(first.name).name} vs {Path(other.name).name}"
        if not np.allclose(other.orientation, first.orientation, atol=1e-4):
            raise MedistillError(f"{label}: slices have different orientations ({pair})")
        if other.size != first.size:
            raise MedistillError(
                f"{label}: slices have different sizes {first.size} and {other.size} ({pair})"
            )
    normal = np.cross(first.orientation[:3], first.orientation[3:])
    slices.sort(key=lambda sl: (float(sl.position @ normal), sl.name))
    kept = [slices[0]]
    for sl in slices[1:]:
        z = float(sl.position @ normal)
        if z - float(kept[-1].position @ normal) >= _SAME_POSITION_MM:
            kept.append(sl)
            continue
        a, b = Path(kept[-1].name), Path(sl.name)
        if _dcmread(a).PixelData != _dcmread(b).PixelData:
            raise MedistillError(
                f"{label}: 2 files at the same position z={_fmt_mm(z)} mm with different pixels "
                f"({a.name}, {b.name}); keep one image per slice position in the folder"
            )
        warnings.warn(
            f"{label}: {b.name} duplicates {a.name} (same position z={_fmt_mm(z)} mm, same pixels); "
            "the copy is ignored",
            stacklevel=4,
        )
    z = np.array([float(sl.position @ normal) for sl in kept])
    steps = np.diff(z)
    if steps.size:
        spacing = float(np.median(steps)) if steps.size >= 3 else float(steps.min())
        tol = max(_SAME_POSITION_MM, _SPACING_REL_TOL * spacing)
        bad = np.flatnonzero(np.abs(steps - spacing) > tol)
        if bad.size:
            i = int(bad[np.argmax(np.abs(steps[bad] - spacing))])
            where = f"between z={_fmt_mm(z[i])} and z={_fmt_mm(z[i + 1])} mm where the spacing is"
            missing = round(steps[i] / spacing) - 1
            if missing >= 1 and abs(steps[i] - (missing + 1) * spacing) <= tol * (missing + 1):
                raise MedistillError(
                    f"{label}: slice gap of {_fmt_mm(steps[i])} mm {where} {_fmt_mm(spacing)} mm "
                    f"({missing} missing slice{'s' if missing > 1 else ''}); restore the missing files"
                )
            raise MedistillError(
                f"{label}: non-uniform slice spacing: a step of {_fmt_mm(steps[i])} mm {where} "
                f"{_fmt_mm(spacing)} mm (steps {_fmt_mm(steps.min())} to {_fmt_mm(steps.max())} mm); "
                "resample it onto uniform slices first"
            )
    step = (kept[-1].position - kept[0].position) / (len(kept) - 1) if len(kept) > 1 else None
    return [sl.name for sl in kept], step


def _read_dicom_series(folder: Path) -> Image:
    try:
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError as exc:
        raise MedistillError(f"{folder}: cannot scan for DICOM series ({exc})") from exc
    if not series:
        raise MedistillError(f"{folder}: folder holds no DICOM series")
    if len(series) > 1:
        listing = ", ".join(
            f"{uid} ({len(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))} files)"
            for uid in series
        )
        raise MedistillError(
            f"{folder}: folder holds {len(series)} DICOM series ({listing}); keep one per folder"
        )
    files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0]))
    first = _dcmread(Path(files[0]))
    _check_dicom_kind(first, Path(files[0]))
    files, step = _order_series(folder, files)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    # our own checks above replace ITK's raw "non uniform sampling" warning, which ITK prints and reads on
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        img = reader.Execute()
    except RuntimeError as exc:
        raise MedistillError(
            f"{folder}: cannot read DICOM series ({str(exc).strip().splitlines()[-1]})"
        ) from exc
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)
    image = _from_sitk(img, folder)
    if step is not None and image.ndim == 3:
        # the slices lie exactly where their positions say (also for a tilted gantry, where the step
        # leaves the normal); for an ordinary series this equals ITK's own column
        image.affine[:3, 2] = _LPS_TO_RAS[:3, :3] @ step
    image.modality = _dicom_modality(first)
    if str(first.get("Modality", "")).upper() == "CT":
        image.array = image.array.astype(np.float32, copy=False)
    return image


# ------------------------------------------------------------------------------------------- PNG / TIFF


def _read_raster(path: Path) -> Image:
    modality = None
    try:
        with PILImage.open(path) as im:
            im.load()
            if getattr(im, "n_frames", 1) > 1:
                raise MedistillError(f"{path}: multi-page TIFF; store volumes as NIfTI/MHA instead")
            text = im.info.get(_AFFINE_KEY) or (im.tag_v2.get(270) if hasattr(im, "tag_v2") else None)
            if im.mode in ("RGB", "RGBA", "P", "LA", "CMYK", "YCbCr"):
                rgb = np.asarray(im.convert("RGB"))
                if not (
                    np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])
                ):
                    warnings.warn(f"{path}: colour image converted to grey (ITU-R 601 luma)", stacklevel=3)
                    modality = "colour"
                array = np.asarray(im.convert("L"))
            else:
                array = np.asarray(im)
    except MedistillError:
        raise
    except Exception as exc:  # PIL.UnidentifiedImageError, truncated-file OSError, ...
        raise MedistillError(f"{path}: not a readable PNG/TIFF image ({exc})") from exc
    affine = _affine_2d_default()
    if text:
        try:
            stored = np.asarray(json.loads(text), float)
            if stored.shape == (4, 4):
                affine = stored
        except (ValueError, TypeError):
            pass  # a description written by another program, not our geometry
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("="))
    return Image(np.array(array), affine, modality)


def _raster_spacing_known(path: Path) -> bool:
    """Whether a PNG/TIFF carries medistill's stored geometry (otherwise its spacing is unknown)."""
    with PILImage.open(path) as im:
        if im.info.get(_AFFINE_KEY):
            return True
        text = im.tag_v2.get(270) if hasattr(im, "tag_v2") else None
    try:
        return np.asarray(json.loads(text), float).shape == (4, 4) if text else False
    except (ValueError, TypeError):
        return False


def _write_raster(image: Image, path: Path) -> None:
    if image.ndim != 2:
        raise MedistillError(f"{path}: PNG/TIFF hold 2D images; this one has shape {image.shape}")
    arr = image.array
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    is_png = path.name.lower().endswith(".png")
    allowed = (np.uint8, np.uint16) if is_png else (np.uint8, np.uint16, np.int32, np.float32)
    if arr.dtype.type not in allowed:
        names = ", ".join(np.dtype(t).name for t in allowed)
        raise MedistillError(
            f"{path}: cannot store dtype {arr.dtype} in {path.suffix}; pass dtype= one of {names}"
        )
    text = json.dumps(image.affine.tolist())
    im = PILImage.fromarray(np.ascontiguousarray(arr))
    with atomic_path(path) as tmp:
        if is_png:
            info = PngImagePlugin.PngInfo()
            info.add_text(_AFFINE_KEY, text)
            im.save(tmp, format="PNG", pnginfo=info)
        else:
            im.save(tmp, format="TIFF", description=text)


# ---------------------------------------------------------------------------------------------- public


class Grid(NamedTuple):
    """Where an image file's voxels lie, read from its header: spatial shape, RAS affine, channels."""

    shape: tuple[int, ...]
    affine: np.ndarray
    channels: int


def read_grid(path: PathLike) -> Grid:
    """The voxel grid of an image file without loading its voxels (NIfTI, MHA/MHD/NRRD headers).

    Dataset checks use this to compare hundreds of image/label grids in seconds; other formats fall
    back to reading the image.
    """
    path = Path(path)
    _require_exists(path)
    suffix = _suffix(path)
    if suffix in NIFTI_SUFFIXES:
        img = _load_nifti(path)
        shape = tuple(int(s) for s in img.shape)
        spatial = shape[:3] if len(shape) > 3 else shape
        channels = int(np.prod(shape[3:])) if len(shape) > 3 else 1
        return Grid(spatial, np.asarray(img.affine, float), channels)
    if suffix in ITK_SUFFIXES:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError as exc:
            raise MedistillError(
                f"{path}: not a readable image ({str(exc).strip().splitlines()[-1]})"
            ) from exc
        size, full = reader.GetSize(), reader.GetDimension()
        dim = 3 if full == 4 and size[3] == 1 else full  # a 4D file with one volume is that volume
        _check_itk_layout(dim, reader.GetNumberOfComponents(), path)
        direction = np.asarray(reader.GetDirection(), float).reshape(full, full)[:dim, :dim]
        spacing, origin = reader.GetSpacing()[:dim], reader.GetOrigin()[:dim]
        shape = tuple(int(s) for s in (size[:3] if dim == 3 else size[::-1]))
        return Grid(shape, _itk_affine(tuple(direction.ravel()), spacing, origin), 1)
    image = read_image(path)
    return Grid(image.shape, image.affine, 1)


def read_image(path: PathLike) -> Image:
    """Read a 2D/3D image: .nii/.nii.gz, .mha/.mhd/.nrrd, a DICOM series folder or file, .png/.tif.

    Every failure (missing, truncated, corrupt, wrong DICOM kind, unsupported format) is a
    :class:`MedistillError` naming the path.
    """
    path = Path(path)
    _require_exists(path)
    suffix = _suffix(path)
    if path.is_dir():
        image = _read_dicom_series(path)
    elif suffix in NIFTI_SUFFIXES:
        image = _read_nifti(path)
    elif suffix in ITK_SUFFIXES:
        image = _read_itk(path)
    elif suffix in RASTER_SUFFIXES:
        image = _read_raster(path)
    elif suffix in DICOM_SUFFIXES or _is_dicom_file(path):
        image = _read_dicom_file(path)
    else:
        raise MedistillError(
            f"{path}: unsupported image format {suffix or '(no extension)'}; "
            f"supported: {', '.join(READ_SUFFIXES)} or a folder holding one DICOM series"
        )
    return _check_finite(image, path)


def write_image(image: Image, path: PathLike, dtype: np.typing.DTypeLike | None = None) -> None:
    """Write ``image`` atomically, format chosen by extension (.nii.gz, .nii, .mha, .mhd, .nrrd, .png, .tif).

    ``dtype`` casts the values first (e.g. ``np.uint8`` for a label map, ``np.int16`` for HU).
    """
    path = Path(path)
    suffix = _suffix(path)
    if dtype is not None:
        image = Image(image.array.astype(dtype), image.affine)
    if suffix in NIFTI_SUFFIXES:
        _write_nifti(image.array, image.affine, path)
    elif suffix in ITK_SUFFIXES:
        _write_itk(image, path)
    elif suffix in RASTER_SUFFIXES:
        _write_raster(image, path)
    else:
        raise MedistillError(
            f"{path}: cannot write format {suffix or '(no extension)'}; "
            f"use one of {', '.join(WRITE_SUFFIXES)}"
        )


def read_radiograph(path: PathLike) -> Image:
    """Read a 2D projection radiograph as float32 where higher means more attenuation.

    DICOM MONOCHROME1 images (where bone is dark in the stored values) are inverted within the stored
    bit range, so bone is bright as in MONOCHROME2. Spacing comes from PixelSpacing, else
    ImagerPixelSpacing (detector plane); when neither is usable we warn and assume 1.0 mm.
    """
    path = Path(path)
    _require_exists(path)
    suffix = _suffix(path)
    if path.is_dir():
        raise MedistillError(f"{path}: a radiograph is one file, not a folder")
    if suffix in RASTER_SUFFIXES:
        image = _check_finite(_read_raster(path), path)
        if not _raster_spacing_known(path):
            warnings.warn(f"{path}: no pixel spacing stored; assuming 1.0 mm", stacklevel=2)
        return Image(image.array.astype(np.float32), image.affine, image.modality)
    if not (suffix in DICOM_SUFFIXES or _is_dicom_file(path)):
        raise MedistillError(f"{path}: radiographs are read from DICOM, PNG or TIFF, not {suffix or '?'}")
    ds = _dcmread(path)
    image = _check_finite(_read_dicom_file(path, ds), path)
    if image.ndim != 2:
        raise MedistillError(f"{path}: a {image.ndim}D DICOM, not a 2D radiograph")
    values = image.array.astype(np.float32)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        bits = int(ds.get("BitsStored", 16))
        signed = int(ds.get("PixelRepresentation", 0)) == 1
        lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        ends = _modality_lut(ds, np.asarray([lo, hi])).astype(np.float32)
        values = ends.min() + ends.max() - values
    spacing = _dicom_spacing(ds)
    if spacing is None:
        warnings.warn(f"{path}: no PixelSpacing or ImagerPixelSpacing; assuming 1.0 mm pixels", stacklevel=2)
    return Image(values, image.affine, image.modality)


def grid_differences(
    shape_a: tuple[int, ...],
    affine_a: np.ndarray,
    shape_b: tuple[int, ...],
    affine_b: np.ndarray,
    atol_mm: float = 1e-3,
) -> list[str]:
    """Describe how two voxel grids differ (empty when they match): shape, spacing, origin, direction."""
    problems = []
    if tuple(shape_a) != tuple(shape_b):
        problems.append(f"shape {tuple(shape_a)} vs {tuple(shape_b)}")
    a, b = np.asarray(affine_a, float), np.asarray(affine_b, float)
    if not np.allclose(a, b, rtol=0, atol=atol_mm):
        n = min(len(shape_a), len(shape_b))
        sa, sb = np.linalg.norm(a[:3, :n], axis=0), np.linalg.norm(b[:3, :n], axis=0)
        if not np.allclose(sa, sb, rtol=0, atol=atol_mm):
            problems.append(f"spacing {np.round(sa, 4).tolist()} vs {np.round(sb, 4).tolist()} mm")
        if not np.allclose(a[:3, 3], b[:3, 3], rtol=0, atol=atol_mm):
            problems.append(f"origin {np.round(a[:3, 3], 3).tolist()} vs {np.round(b[:3, 3], 3).tolist()} mm")
        if len(problems) == (tuple(shape_a) != tuple(shape_b)):
            problems.append(f"affine {np.round(a, 4).tolist()} vs {np.round(b, 4).tolist()}")
    return problems


def check_same_grid(a: Image, b: Image, a_name: str, b_name: str, atol_mm: float = 1e-3) -> None:
    """Raise :class:`MedistillError` unless ``a`` and ``b`` share shape and affine (within ``atol_mm``).

    Image/label pairs must share a grid voxel for voxel; resampling silently would hide a real
    mismatch (wrong label file, flipped export), so we refuse and say what differs.
    """
    problems = grid_differences(a.shape, a.affine, b.shape, b.affine, atol_mm)
    if problems:
        raise MedistillError(f"{a_name} and {b_name} are not on the same grid: {'; '.join(problems)}")
