"""Canonical axial slices: the affine, not the array order, decides slices, rows and columns."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from medistill.errors import MedistillError
from medistill.io.axial import axial_slices


def _world(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """World position (mm) of every voxel, ``(*shape, 3)``."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(float)
    return idx @ affine[:3, :3].T + affine[:3, 3]


ORDERS = list(itertools.product(itertools.permutations(range(3)), [(1, 1, 1), (1, -1, 1), (-1, 1, -1)]))


@pytest.mark.parametrize(("perm", "signs"), ORDERS)
def test_every_axis_order_gives_one_grid_and_keeps_world_positions(
    perm: tuple[int, ...], signs: tuple[int, ...]
) -> None:
    """Store a RAS volume with permuted, reversed axes: the slices and their world grid come out the same."""
    rng = np.random.default_rng(0)
    ras = rng.normal(size=(5, 6, 4))
    ras_affine = np.diag([0.7, 0.8, 2.5, 1.0])
    ras_affine[:3, 3] = (-10.0, 20.0, 5.0)
    reference = axial_slices(ras, ras_affine)
    # the same voxels, stored with array axis a running along world axis perm[a] in direction signs[a]
    stored = np.transpose(ras, perm)
    affine = np.eye(4)
    affine[:3, 3] = ras_affine[:3, 3]
    for a, (axis, sign) in enumerate(zip(perm, signs, strict=True)):
        affine[:3, a] = ras_affine[:3, axis]
        if sign < 0:
            stored = np.flip(stored, a)
            affine[:3, 3] += ras_affine[:3, axis] * (ras.shape[axis] - 1)
            affine[:3, a] *= -1
    out = axial_slices(stored, affine)
    np.testing.assert_array_equal(out.slices, reference.slices)
    np.testing.assert_allclose(out.affine, reference.affine, atol=1e-9)
    # every value keeps its world position: the k-th smallest value, found in both arrays, is at one point
    where_out = _world(out.affine, out.slices.shape).reshape(-1, 3)[np.argsort(out.slices.reshape(-1))]
    where_stored = _world(affine, stored.shape).reshape(-1, 3)[np.argsort(stored.reshape(-1))]
    np.testing.assert_allclose(where_out, where_stored, atol=1e-9)


def test_canonical_view_is_radiological() -> None:
    """Slices inferior -> superior; rows anterior -> posterior; columns patient right -> left."""
    ras = np.zeros((4, 5, 3))
    ras[3, 4, 0] = 1.0  # rightmost (+x), most anterior (+y), most inferior slice
    out = axial_slices(ras, np.diag([1.0, 1.0, 2.0, 1.0]))
    assert out.slices.shape == (3, 5, 4) and out.source_axes == (2, 1, 0)
    assert out.flipped == (False, True, True)
    assert out.slices[0, 0, 0] == 1.0  # first slice, top row, left column
    assert out.spacing_mm == (2.0, 1.0, 1.0)
    with pytest.raises(MedistillError, match="3D volume"):
        axial_slices(np.zeros((4, 5)), np.eye(4))
