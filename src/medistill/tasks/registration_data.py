"""Data for registration: volumes on a fixed network grid, smooth random fields, synthetic cohorts.

* **Network grid**: a volume of any size, spacing and orientation is resampled (trilinear; labels
  nearest) onto ``size^3`` voxels spanning its world bounding box, axis-aligned in RAS+ (array axis
  ``k`` runs along world axis ``k``), so every image reaches the network in one orientation and the
  grid's affine keeps the geometry (see :func:`network_grid`).
* **Smooth random fields**: a cubic B-spline free-form deformation of ``control^3`` knot displacements
  (zero knots beyond the border), drawn as ``sign(r)|r|^power * amplitude`` with
  ``r ~ U(-1, 1)`` (the original's "sample power" augmentation), plus an optional small affine part.
* **Synthetic cohorts with known fields**: subject ``i`` is the atlas warped by a known field ``u_i``
  (``S_i(x) = A(x + u_i(x))``) with a random intensity change. For a pair (fixed ``S_i``, moving ``S_j``)
  the true displacement is ``u_i + w_j o (id + u_i)`` with ``w_j`` the inverse of ``u_j`` (fixed-point
  iteration); with the atlas as moving image it is ``u_i`` exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from medistill.io.images import Image
from medistill.nets.registration import compose, warp

Modality = Literal["ct", "mr"]


def normalise_intensity(array: np.ndarray, modality: Modality, window: tuple[float, float]) -> np.ndarray:
    """CT: HU clipped to ``window`` and scaled to [0, 1]; MR: 0.5-99.5th percentiles of the non-zero
    voxels to [0, 1] (MR has no absolute scale)."""
    if modality == "ct":
        lo, hi = window
    else:
        nz = array[array > 0]
        lo, hi = np.percentile(nz, [0.5, 99.5]) if nz.size else (0.0, 1.0)
    return np.clip((array - lo) / max(hi - lo, 1e-6), 0, 1).astype(np.float32)


def network_grid(affine: np.ndarray, shape: tuple[int, ...], size: int) -> np.ndarray:
    """Affine of the ``size^3`` RAS-aligned grid over the world bounding box of an image's voxel centres."""
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in shape], indexing="ij")).reshape(3, -1)
    world = affine[:3, :3] @ corners + affine[:3, 3:4]
    lo, hi = world.min(1), world.max(1)
    grid = np.eye(4)
    grid[:3, :3] = np.diag((hi - lo) / (size - 1))
    grid[:3, 3] = lo
    return grid


def resample(
    array: np.ndarray | torch.Tensor,
    src_affine: np.ndarray,
    dst_affine: np.ndarray,
    dst_shape: tuple[int, int, int],
    mode: str = "bilinear",
    chunk: int = 32,
    padding: str = "border",
) -> torch.Tensor:
    """``array`` (``C X Y Z`` or ``X Y Z``, voxel-to-world ``src_affine``) sampled at the voxels of the grid
    ``dst_affine`` / ``dst_shape`` -> ``C *dst_shape`` float32, in slabs of ``chunk`` slices along the last
    axis to bound memory. Outside the source: its border values (``padding="border"``, for a grid over
    the source's own box) or 0 (``"zeros"``, for another scan's box: a smaller field of view is not
    extended)."""
    src = torch.as_tensor(np.asarray(array) if not isinstance(array, torch.Tensor) else array).float()
    src = src[None] if src.ndim == 3 else src
    m = torch.from_numpy(np.linalg.inv(src_affine) @ dst_affine).float()  # dst voxel -> src voxel
    size = torch.tensor(src.shape[1:], dtype=torch.float32)
    out = []
    for z0 in range(0, dst_shape[2], chunk):
        zs = torch.arange(z0, min(z0 + chunk, dst_shape[2]), dtype=torch.float32)
        pts = torch.stack(
            torch.meshgrid(
                torch.arange(dst_shape[0]).float(), torch.arange(dst_shape[1]).float(), zs, indexing="ij"
            )
        )
        v = torch.einsum("ij,j...->i...", m[:3, :3], pts) + m[:3, 3].view(3, 1, 1, 1)
        g = (2 * v / (size - 1).clamp(min=1).view(3, 1, 1, 1) - 1).flip(0).permute(1, 2, 3, 0)[None]
        s = F.grid_sample(src[None], g, mode=mode, padding_mode=padding, align_corners=True)
        out.append(s[0])
    return torch.cat(out, -1)


def merge_labels(labels: np.ndarray, structures: dict[str, list[int]]) -> np.ndarray:
    """A label map -> structure indices (``k`` = the k-th structure of ``structures``, 1-based; 0 for
    every other value), several label values merged into one structure (lung lobes -> lungs)."""
    raw = np.rint(labels).astype(np.int64).clip(0)
    top = max([int(raw.max()), *(v for values in structures.values() for v in values)])
    lut = np.zeros(top + 1, np.int16)  # label value -> structure index (one pass over the volume)
    for k, values in enumerate(structures.values(), start=1):
        lut[values] = k
    return lut[raw]


def to_network_grid(
    image: Image, size: int, labels: Image | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, np.ndarray]:
    """(image ``1 S S S``, labels ``1 S S S`` long or None, grid affine) on the network grid."""
    grid = network_grid(image.affine, image.shape, size)
    img = resample(image.array, image.affine, grid, (size,) * 3)
    lab = None
    if labels is not None:
        lab = (
            resample(labels.array.astype(np.float32), labels.affine, grid, (size,) * 3, "nearest")
            .round()
            .long()
        )
    return img, lab, grid


def bspline_basis(length: int, control: int) -> torch.Tensor:
    """``length x control`` weights of a cubic B-spline FFD: ``control`` knots spread over the axis with
    one (zero) knot of padding at each end, so the field fades at the borders."""
    h = (length - 1) / (control + 1)
    t = (torch.arange(length, dtype=torch.float32)[:, None] - h * torch.arange(1, control + 1)[None]) / h
    a = t.abs()
    outer = torch.where(a < 2, (2 - a) ** 3 / 6, torch.zeros_like(a))
    return torch.where(a < 1, 2 / 3 - a**2 + a**3 / 2, outer)


def smooth_field(
    shape: tuple[int, ...],
    rng: np.random.Generator,
    amplitude: float,
    control: int = 5,
    power: float = 3.0,
    rotation_deg: float = 0.0,
    scale: float = 0.0,
    shift: float = 0.0,
) -> torch.Tensor:
    """A random smooth displacement ``N *shape`` in voxels: cubic B-spline of ``control^N`` points
    (zero-padded) with components ``sign(r)|r|^power * amplitude``, plus an affine part with rotations up
    to ``rotation_deg`` about each axis, scale up to ``scale`` (fraction), shift up to ``shift`` voxels."""
    n = len(shape)
    ctrl = np.sign(r := rng.uniform(-1, 1, (n, *(control,) * n))) * np.abs(r) ** power * amplitude
    u = torch.from_numpy(ctrl.astype(np.float32))
    for axis, length in enumerate(shape):  # separable: contract each control axis with its basis matrix
        basis = bspline_basis(length, control)
        u = torch.movedim(torch.tensordot(u, basis, dims=([axis + 1], [1])), -1, axis + 1)
    if rotation_deg or scale or shift:
        from scipy.spatial.transform import Rotation

        rot = Rotation.from_euler(
            "xyz", rng.uniform(-rotation_deg, rotation_deg, 3), degrees=True
        ).as_matrix()
        a = rot[:n, :n] * (1 + rng.uniform(-scale, scale, n))[None]
        axes = [torch.arange(s, dtype=torch.float32) - (s - 1) / 2 for s in shape]
        x = torch.stack(torch.meshgrid(*axes, indexing="ij")).flatten(1)
        lin = torch.from_numpy((a - np.eye(n)).astype(np.float32)) @ x
        u = (
            u
            + lin.view(n, *shape)
            + torch.from_numpy(rng.uniform(-shift, shift, n).astype(np.float32)).view(n, *([1] * n))
        )
    return u


def invert_field(u: torch.Tensor, iterations: int = 30) -> torch.Tensor:
    """Displacement ``w`` of the inverse of ``x -> x + u(x)`` (``u`` ``B N *spatial``): ``w = -u o (id + w)``
    by fixed-point iteration (converges for fields with ``|grad u| < 1``)."""
    w = -u
    for _ in range(iterations):
        w = -warp(u, w)
    return w


@dataclass
class Subject:
    """One volume on the network grid: intensities ``1 S S S`` in [0, 1], labels ``1 S S S`` (long), and
    for a synthetic subject its field from the atlas ``N S S S`` (voxels)."""

    name: str
    image: torch.Tensor
    labels: torch.Tensor
    field: torch.Tensor | None = None


def synthetic_subject(
    name: str,
    atlas: torch.Tensor,
    atlas_labels: torch.Tensor,
    rng: np.random.Generator,
    amplitude: float,
    rotation_deg: float,
    shift: float,
) -> Subject:
    """The atlas warped by a known smooth field, with a random gamma and noise."""
    u = smooth_field(atlas.shape[1:], rng, amplitude, rotation_deg=rotation_deg, scale=0.03, shift=shift)
    img = warp(atlas[None], u[None])[0]
    from medistill.nets.registration import SpatialTransformer

    lab = SpatialTransformer("nearest")(atlas_labels[None].float(), u[None])[0].round().long()
    gamma = float(np.exp(rng.normal(0, 0.1)))
    img = (
        img.clamp(0, 1) ** gamma + torch.from_numpy(rng.normal(0, 0.01, img.shape).astype(np.float32))
    ).clamp(0, 1)
    return Subject(name, img, lab, u)


def true_displacement(fixed: Subject, moving: Subject) -> torch.Tensor | None:
    """The known displacement of a synthetic pair (``N *spatial`` voxels; None for real subjects)."""
    if fixed.field is None:
        return None
    if moving.field is None:  # the moving image is the atlas itself
        return fixed.field
    return compose(invert_field(moving.field[None]), fixed.field[None])[0]


def pair_item(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    fixed_labels: torch.Tensor,
    moving_labels: torch.Tensor,
    augment: float,
    rng: np.random.Generator | None,
) -> dict[str, torch.Tensor]:
    """One training / validation item of a pair (``1 S S S`` each); when training (``rng``) with
    ``augment`` > 0 the moving image is warped by a random smooth field of that amplitude (voxels), so the
    teacher and the student see the same augmented pair (it is one sample)."""
    if augment and rng is not None:
        u = smooth_field(moving.shape[1:], rng, augment)
        moving = warp(moving[None], u[None])[0]
    return {"fixed": fixed, "moving": moving, "fixed_labels": fixed_labels, "moving_labels": moving_labels}
