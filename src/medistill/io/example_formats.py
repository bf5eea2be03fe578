"""Readers for the example sets whose files are not plain images: 3D Slicer label maps, InVesalius projects.

* ``*.seg.nrrd`` (3D Slicer segmentation): an ordinary NRRD label map whose segment names and values
  sit in header keys ``Segment<i>_Name`` / ``Segment<i>_LabelValue``. We read the voxels with
  :func:`medistill.io.images.read_image` and the keys with SimpleITK's header-only reader.
* ``*.inv3`` (InVesalius 3 project): a gzip tar holding ``main.plist`` (shape, dtype, spacing),
  ``matrix.dat`` (the raw volume, C order ``(z, y, x)``) and per-mask ``mask_<k>.plist`` /
  ``mask_<k>.dat``. InVesalius stores each mask one plane larger on every axis (plane 0 is its
  bookkeeping, values 0/1) and marks inside voxels with 255, so we drop the first plane of each axis
  and keep ``== 255``.

Orientation of ``Cranium.inv3`` (the ``head-ct`` set), checked against the anatomy: along the slice
axis the body's cross-section shrinks to nothing at the last slices (the vertex) and the teeth are in
the first slices, so slice index grows towards Superior. In a slice, the teeth and the face are at
high row index and the curved head-rest the patient lies on at low row index, so the row index grows
towards Anterior (consistent with VTK's bottom-up row order applied to DICOM rows that run A -> P). Left
and right cannot be told from this anatomy (no marker, nothing lateralised); we keep the DICOM column
direction, column index growing towards the patient's Left, which gives LAS like most scanner
exports. A left-right mirror would not change any HU statistic, only which side is called left.
The file has no patient position, so the world origin is put at the centre of the volume.
"""

from __future__ import annotations

import plistlib
import tarfile
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import SimpleITK as sitk

from medistill.errors import MedistillError
from medistill.io.images import Image, PathLike, check_same_grid, read_image, write_image

#: Files :func:`write_head_ct_niftis` derives from ``Cranium.inv3`` (NIfTI, readable by every tool).
HEAD_CT_NIFTIS = ("head_ct.nii.gz", "head_ct_bone.nii.gz", "head_ct_soft_tissue.nii.gz")

_INV3_INSIDE = 255


# ------------------------------------------------------------------------------------ 3D Slicer seg.nrrd


def read_segment_names(path: PathLike) -> dict[str, int]:
    """``{segment name: label value}`` from a 3D Slicer ``.seg.nrrd`` header (no voxels are read)."""
    path = Path(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise MedistillError(f"{path}: not a readable NRRD ({str(exc).strip().splitlines()[-1]})") from exc
    keys = set(reader.GetMetaDataKeys())
    names: dict[str, int] = {}
    i = 0
    while f"Segment{i}_Name" in keys:
        value_key = f"Segment{i}_LabelValue"
        if value_key not in keys:
            raise MedistillError(f"{path}: header has Segment{i}_Name but no {value_key}")
        name, raw = reader.GetMetaData(f"Segment{i}_Name"), reader.GetMetaData(value_key)
        try:
            value = int(raw)
        except ValueError:
            raise MedistillError(f"{path}: {value_key} is {raw!r}, not an integer") from None
        if name in names:
            raise MedistillError(f"{path}: segment name {name!r} appears twice")
        names[name] = value
        i += 1
    if not names:
        raise MedistillError(
            f"{path}: no Segment0_Name / Segment0_LabelValue keys; not a Slicer segmentation"
        )
    if reader.GetDimension() != 3:
        # several layers (overlapping segments) come as a 4D array: values are then per layer
        raise MedistillError(
            f"{path}: a {reader.GetDimension()}D segmentation (overlapping layers); only one-layer label maps"
        )
    return names


def read_segmentation(path: PathLike) -> tuple[Image, dict[str, int]]:
    """A 3D Slicer ``.seg.nrrd`` label map and its ``{segment name: label value}`` table."""
    names = read_segment_names(path)
    return read_image(path), names


def load_chest_ct_2(folder: PathLike) -> tuple[Image, Image, dict[str, int]]:
    """The ``chest-ct-2`` set: (CT in HU, label map, ``{name: value}``), the label map checked to be on
    the CT's grid (so voxel ``(i, j, k)`` of one is voxel ``(i, j, k)`` of the other)."""
    folder = Path(folder)
    ct = read_image(folder / "CTChest4.nrrd")
    labels, names = read_segmentation(folder / "Segmentation.seg.nrrd")
    check_same_grid(ct, labels, "CTChest4.nrrd", "Segmentation.seg.nrrd")
    return Image(ct.array.astype(np.float32), ct.affine), labels, names


# ------------------------------------------------------------------------------------ InVesalius .inv3


class Inv3(NamedTuple):
    """An InVesalius project's volume and masks, in medistill's convention (NIfTI order, RAS+).

    Attributes:
        image: the volume as float32 (HU for CT), array ``(x, y, z)``.
        masks: mask file stem (``"mask_0"``) -> boolean array on the image's grid.
        thresholds: mask file stem -> the ``(low, high)`` threshold range InVesalius recorded.
    """

    image: Image
    masks: dict[str, np.ndarray]
    thresholds: dict[str, tuple[float, float]]


def _plist(members: dict[str, bytes], name: str, path: Path) -> dict[str, Any]:
    if name not in members:
        raise MedistillError(f"{path}: no {name} inside; not an InVesalius project")
    try:
        return plistlib.loads(members[name])
    except plistlib.InvalidFileException as exc:
        raise MedistillError(f"{path}: {name} is not a readable plist ({exc})") from exc


def _raw_volume(members: dict[str, bytes], name: str, dtype: str, shape: list[int], path: Path) -> np.ndarray:
    """A raw C-order array; InVesalius writes numpy memmaps of a little-endian machine."""
    if name not in members:
        raise MedistillError(f"{path}: no {name} inside")
    kind = np.dtype(dtype).newbyteorder("<")
    expected = int(np.prod(shape)) * kind.itemsize
    if len(members[name]) != expected:
        raise MedistillError(
            f"{path}: {name} has {len(members[name])} bytes, expected {expected} for {dtype} {tuple(shape)}"
        )
    return np.frombuffer(members[name], dtype=kind).reshape(shape)


def _inv3_affine(shape_zyx: tuple[int, int, int], spacing_xyz: tuple[float, float, float]) -> np.ndarray:
    """RAS+ affine of the ``(x, y, z)`` array: column towards Left, row towards Anterior, slice towards
    Superior (see the module docstring for how this was checked), centred on world 0."""
    sx, sy, sz = spacing_xyz
    affine = np.diag([-sx, sy, sz, 1.0])
    centre = (np.array(shape_zyx[::-1], float) - 1) / 2
    affine[:3, 3] = -affine[:3, :3] @ centre
    return affine


def read_inv3(path: PathLike) -> Inv3:
    """Read an InVesalius 3 project (``.inv3``): the volume with a RAS affine, and its masks.

    Shape, dtype and spacing come from ``main.plist`` and each mask's ``mask_<k>.plist``, not from
    what we know of one file. Masks must be the volume's shape plus one on every axis.
    """
    path = Path(path)
    try:
        with tarfile.open(path, "r:gz") as tar:
            members = {}
            for info in tar.getmembers():
                if info.isfile():
                    handle = tar.extractfile(info)
                    if handle is not None:
                        members[info.name.rsplit("/", 1)[-1]] = handle.read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise MedistillError(f"{path}: not a readable InVesalius project (gzip tar): {exc}") from exc
    main = _plist(members, "main.plist", path)
    try:
        matrix = main["matrix"]
        shape = [int(s) for s in matrix["shape"]]
        spacing = tuple(float(s) for s in main["spacing"])
        filename, dtype = str(matrix["filename"]), str(matrix["dtype"])
    except (KeyError, TypeError, ValueError) as exc:
        raise MedistillError(
            f"{path}: main.plist lacks matrix shape/dtype/filename or spacing ({exc})"
        ) from exc
    if len(shape) != 3 or len(spacing) != 3 or min(spacing) <= 0:
        raise MedistillError(f"{path}: main.plist shape {shape} / spacing {spacing} is not a 3D volume")
    volume = _raw_volume(members, filename, dtype, shape, path)  # (z, y, x)
    affine = _inv3_affine((shape[0], shape[1], shape[2]), spacing)  # type: ignore[arg-type]
    image = Image(np.ascontiguousarray(volume.transpose(2, 1, 0), dtype=np.float32), affine)
    masks: dict[str, np.ndarray] = {}
    thresholds: dict[str, tuple[float, float]] = {}
    for key in sorted(main.get("masks", {}), key=int):
        info = _plist(members, str(main["masks"][key]), path)
        mask_file = str(info["mask_file"])
        mask_shape = [int(s) for s in info["mask_shape"]]
        if mask_shape != [s + 1 for s in shape]:
            raise MedistillError(
                f"{path}: {mask_file} has shape {mask_shape}, expected the volume's {shape} + 1"
            )
        raw = _raw_volume(members, mask_file, "uint8", mask_shape, path)[1:, 1:, 1:]
        stem = mask_file.rsplit(".", 1)[0]
        masks[stem] = np.ascontiguousarray((raw == _INV3_INSIDE).transpose(2, 1, 0))
        low, high = info.get("threshold_range", (np.nan, np.nan))
        thresholds[stem] = (float(low), float(high))
    return Inv3(image, masks, thresholds)


class HeadCT(NamedTuple):
    """The ``head-ct`` set: CT in HU and InVesalius' two threshold masks, all on one grid."""

    image: Image
    bone: np.ndarray
    soft_tissue: np.ndarray


def load_head_ct(path: PathLike) -> HeadCT:
    """``Cranium.inv3``: its ``mask_0`` is the bone threshold mask, ``mask_1`` the soft-tissue one."""
    project = read_inv3(path)
    missing = [m for m in ("mask_0", "mask_1") if m not in project.masks]
    if missing:
        raise MedistillError(f"{path}: no {', '.join(missing)} (bone / soft tissue masks of the head-ct set)")
    return HeadCT(project.image, project.masks["mask_0"], project.masks["mask_1"])


def write_head_ct_niftis(folder: PathLike) -> None:
    """Convert ``folder/Cranium.inv3`` once into :data:`HEAD_CT_NIFTIS` (int16 HU, uint8 masks) so any
    tool reads the head CT with :func:`~medistill.io.images.read_image`. Each file is written atomically."""
    folder = Path(folder)
    head = load_head_ct(folder / "Cranium.inv3")
    ct_name, bone_name, soft_name = HEAD_CT_NIFTIS
    write_image(head.image, folder / ct_name, dtype=np.int16)  # the stored values are int16 HU
    write_image(Image(head.bone, head.image.affine), folder / bone_name, dtype=np.uint8)
    write_image(Image(head.soft_tissue, head.image.affine), folder / soft_name, dtype=np.uint8)


# ------------------------------------------------------------------------------------ head MR, label tables


def read_label_table(path: PathLike) -> dict[str, int]:
    """``{name: value}`` from a MRIcron-style label table: one ``value name [code]`` per line."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise MedistillError(f"{path}: cannot read label table ({exc})") from exc
    table: dict[str, int] = {}
    for n, line in enumerate(lines, 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 2 or not fields[0].isdigit():
            raise MedistillError(f"{path}: line {n} is {line!r}, expected 'value name [code]'")
        table[fields[1]] = int(fields[0])
    return table


def load_head_mr(folder: PathLike) -> tuple[Image, Image, dict[str, int]]:
    """The ``head-mr`` set: (Colin27 T1 with skull, AAL label map, ``{region name: value}``), the atlas
    checked to be on the T1's grid."""
    folder = Path(folder)
    t1 = read_image(folder / "ch2.nii.gz")
    aal = read_image(folder / "aal.nii.gz")
    check_same_grid(t1, aal, "ch2.nii.gz", "aal.nii.gz")
    return Image(t1.array.astype(np.float32), t1.affine), aal, read_label_table(folder / "aal.nii.txt")
