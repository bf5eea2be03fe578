"""Axial slices of a CT from its affine, in the one in-plane orientation radiologists read.

Why: a volume's array order says nothing about anatomy: the same CT comes as RAS from nibabel, LAS from
many scanners' NIfTI exports, LPS from ITK, or with the axes permuted (PRS, ...). Code that cuts
``array[:, :, k]`` and transposes by habit gets sideways or mirrored slices for some of them. Here the
affine decides: the slice axis is the array axis that runs most nearly head-foot (:func:`axial_axis`),
and each slice is brought, by axis permutation and flips only (no resampling), to **rows anterior ->
posterior, columns patient right -> left** (the radiological view from the feet, as a DICOM axial slice is
stored), slices ordered **inferior -> superior**. So every storage order of one CT gives the same slices.
Oblique volumes get the nearest such orientation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medistill.errors import MedistillError

#: (world axis, sign) of the (slice, row, column) index steps: +S, -A (to posterior), -R (to patient left).
_TARGET = {0: (2, +1.0), 1: (1, -1.0), 2: (0, -1.0)}


def axial_axis(affine: np.ndarray) -> int:
    """The array axis that runs most nearly head-foot (world z), i.e. the axis of axial slices."""
    cols = np.asarray(affine)[:3, :3]
    return int(np.argmax(np.abs(cols[2]) / np.linalg.norm(cols, axis=0)))


@dataclass(frozen=True)
class AxialSlices:
    """Axial slices in the canonical orientation.

    Attributes:
        slices: ``S H W`` array; ``slices[s, r, c]``: slice ``s`` (inferior -> superior), row ``r``
            (anterior -> posterior), column ``c`` (patient right -> left).
        affine: ``(4, 4)`` voxel ``(s, r, c, 1)`` -> world RAS+ mm of ``slices`` (the input grid, reordered).
        source_axes: for (slice, row, column), the input array axis it came from.
        flipped: for (slice, row, column), whether that input axis was reversed.
    """

    slices: np.ndarray
    affine: np.ndarray
    source_axes: tuple[int, int, int]
    flipped: tuple[bool, bool, bool]

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """Millimetres per (slice, row, column) step."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]


def axial_slices(array: np.ndarray, affine: np.ndarray) -> AxialSlices:
    """Canonical axial slices (see the module docstring) of a 3D ``array`` with its RAS+ ``affine``.

    The slice axis is :func:`axial_axis`; of the other two, the one closer to world y becomes the rows.
    """
    array = np.asarray(array)
    affine = np.asarray(affine, dtype=np.float64)
    if array.ndim != 3:
        raise MedistillError(f"axial slices need a 3D volume, got an array of shape {array.shape}")
    cols = affine[:3, :3]
    norms = np.linalg.norm(cols, axis=0)
    if not np.all(norms > 0):
        raise MedistillError(f"axial slices need an affine with non-zero voxel steps, got\n{affine}")
    unit = cols / norms
    slice_axis = axial_axis(affine)
    rest = [a for a in range(3) if a != slice_axis]
    row_axis = max(rest, key=lambda a: abs(unit[1, a]))  # the first of equals wins: deterministic
    col_axis = next(a for a in rest if a != row_axis)
    axes = (slice_axis, row_axis, col_axis)
    flips = tuple(bool(unit[_TARGET[i][0], a] * _TARGET[i][1] < 0) for i, a in enumerate(axes))
    out = np.transpose(array, axes)
    steps = cols[:, list(axes)].copy()
    origin = affine[:3, 3].copy()
    index = [slice(None)] * 3
    for i, flip in enumerate(flips):
        if flip:
            index[i] = slice(None, None, -1)
            origin += steps[:, i] * (out.shape[i] - 1)  # the new first voxel is the old last one
            steps[:, i] = -steps[:, i]
    new_affine = np.eye(4)
    new_affine[:3, :3], new_affine[:3, 3] = steps, origin
    return AxialSlices(np.ascontiguousarray(out[tuple(index)]), new_affine, axes, flips)  # type: ignore[arg-type]


def from_axial(stack: np.ndarray, axial: AxialSlices) -> np.ndarray:
    """The inverse of :func:`axial_slices`: an ``S H W`` array on ``axial``'s canonical grid (a
    prediction) back in the input array's axis order and directions, so it overlays the input."""
    if tuple(stack.shape) != tuple(axial.slices.shape):
        raise MedistillError(f"from_axial: expected shape {axial.slices.shape}, got {stack.shape}")
    index = tuple(slice(None, None, -1) if f else slice(None) for f in axial.flipped)
    return np.ascontiguousarray(np.transpose(stack[index], np.argsort(axial.source_axes)))
