"""Registration metrics on dense displacement fields: warped-label Dice, TRE, Jacobian folding.

Convention (the one of MONAI's ``Warp`` and VoxelMorph): a displacement field ``u`` has shape
``B N *spatial`` (``N`` = 2 or 3 spatial dims), channel ``k`` is the displacement along spatial axis ``k``
of the tensor, and the transform maps a fixed-image point ``x`` to the moving-image point ``x + u(x)``
(``warped(x) = moving(x + u(x))``). ``u`` is in voxel units unless ``units="mm"``; ``spacing_mm`` gives the
voxel size per spatial axis (default 1 mm). Distances are reported in mm.

The Jacobian determinant of ``x + u(x)`` uses central differences (``torch.gradient``: one-sided at the
border), so it is exact for fields linear in ``x``. Folding is the percentage of voxels with
``det <= 0``; the SD of ``log det`` is taken over the voxels with ``det > 0`` only (their count is
returned), as is usual since the log is undefined elsewhere. Values are per batch item.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medistill.errors import MedistillError
from medistill.metrics.segmentation import score_structures, summarise


def _check_field(u: torch.Tensor, what: str = "displacement") -> int:
    if u.ndim not in (4, 5) or u.shape[1] != u.ndim - 2:
        raise MedistillError(f"{what}: expected B 2 H W or B 3 D H W, got shape {tuple(u.shape)}")
    return u.ndim - 2


def _spacing(spacing_mm: Sequence[float] | None, n: int, ref: torch.Tensor) -> torch.Tensor:
    s = [1.0] * n if spacing_mm is None else [float(v) for v in spacing_mm]
    if len(s) != n or min(s) <= 0:
        raise MedistillError(f"spacing_mm must be {n} positive values (mm per voxel), got {list(s)}")
    return torch.tensor(s, dtype=ref.dtype, device=ref.device)


def _to_mm(u: torch.Tensor, spacing: torch.Tensor, units: str, axis: int = 1) -> torch.Tensor:
    """Displacements in ``units`` ("voxel" or "mm") with components along ``axis`` -> mm."""
    if units not in ("voxel", "mm"):
        raise MedistillError(f"units must be 'voxel' or 'mm', got {units!r}")
    view = [1] * u.ndim
    view[axis] = -1
    return u if units == "mm" else u * spacing.view(view)


def _stats(values: list[torch.Tensor]) -> dict[str, Any]:
    """Per batch item: mean, median, 90th percentile, max and count of 1D tensors (NaN when empty)."""
    arrays = [v.detach().double().cpu().numpy() for v in values]

    def each(f: Any) -> list[float]:
        return [float(f(a)) if a.size else float("nan") for a in arrays]

    return {
        "mean_mm": each(np.mean),
        "median_mm": each(np.median),
        "p90_mm": each(lambda a: np.percentile(a, 90)),
        "max_mm": each(np.max),
        "n": [int(a.size) for a in arrays],
        "per": "batch item",
    }


def _batch_masks(mask: torch.Tensor | None, shape: torch.Size) -> list[torch.Tensor | None]:
    """``B *spatial`` (or ``*spatial``, shared) boolean mask -> one mask per batch item."""
    if mask is None:
        return [None] * shape[0]
    m = torch.as_tensor(mask).bool()
    m = m.expand(shape[0], *shape[2:]) if m.shape == shape[2:] else m
    if m.shape != (shape[0], *shape[2:]):
        raise MedistillError(f"mask shape {tuple(m.shape)} fits neither {tuple(shape[2:])} nor B x that")
    return list(m)


def jacobian_determinant(
    displacement: torch.Tensor, spacing_mm: Sequence[float] | None = None, units: str = "voxel"
) -> torch.Tensor:
    """``det(I + du/dx)`` of ``x + u(x)``, ``B *spatial``, ``x`` and ``u`` in mm (central differences)."""
    n = _check_field(displacement)
    s = _spacing(spacing_mm, n, displacement)
    u = _to_mm(displacement, s, units)
    # grads[i][j] = d u_i / d x_j in mm/mm
    grads = [
        torch.gradient(u[:, i], spacing=[float(v) for v in s], dim=list(range(1, n + 1))) for i in range(n)
    ]
    jac = torch.stack([torch.stack(g, -1) for g in grads], -2)  # B *spatial N N
    return torch.linalg.det(jac + torch.eye(n, dtype=u.dtype, device=u.device))


def jacobian_stats(
    displacement: torch.Tensor,
    spacing_mm: Sequence[float] | None = None,
    units: str = "voxel",
    mask: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Per batch item: % of voxels with ``det J <= 0`` (folding) and the SD of ``log det J`` over the voxels
    with ``det J > 0`` (``n_positive`` of ``n_voxels``), optionally inside ``mask`` (``*spatial`` or
    ``B *spatial``)."""
    det = jacobian_determinant(displacement, spacing_mm, units)
    folding, sd_log, n_pos, n_all = [], [], [], []
    for d, m in zip(det, _batch_masks(mask, displacement.shape), strict=True):
        v = d.flatten() if m is None else d[m.to(d.device)]
        pos = v[v > 0]
        folding.append(float(100.0 * (v <= 0).double().mean()) if v.numel() else float("nan"))
        sd_log.append(float(pos.double().log().std(correction=0)) if pos.numel() else float("nan"))
        n_pos.append(int(pos.numel()))
        n_all.append(int(v.numel()))
    return {
        "folding_percent": folding,
        "sd_log_jacobian": sd_log,
        "sd_log_jacobian_over": "voxels with det J > 0 (population SD)",
        "n_positive": n_pos,
        "n_voxels": n_all,
        "per": "batch item",
    }


def field_tre(
    displacement: torch.Tensor,
    reference: torch.Tensor,
    spacing_mm: Sequence[float] | None = None,
    units: str = "voxel",
    mask: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Dense target registration error: ``|u(x) - u_ref(x)|`` in mm at every voxel (or inside ``mask``),
    summarised per batch item by mean, median, 90th percentile and max."""
    n = _check_field(displacement)
    if reference.shape != displacement.shape:
        raise MedistillError(
            f"reference shape {tuple(reference.shape)} differs from {tuple(displacement.shape)}"
        )
    s = _spacing(spacing_mm, n, displacement)
    err = (_to_mm(displacement, s, units) - _to_mm(reference.to(displacement), s, units)).norm(dim=1)
    masks = _batch_masks(mask, displacement.shape)
    return _stats([e.flatten() if m is None else e[m.to(e.device)] for e, m in zip(err, masks, strict=True)])


def sample_displacement(displacement: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """``u`` (``B N *spatial``) linearly interpolated at ``points`` ``B P N`` (voxel indices, axis order of
    the tensor) -> ``B P N`` in the field's own units; points outside take the border value."""
    n = _check_field(displacement)
    if points.ndim != 3 or points.shape[0] != displacement.shape[0] or points.shape[2] != n:
        raise MedistillError(
            f"points: expected B P {n} for a field {tuple(displacement.shape)}, got {tuple(points.shape)}"
        )
    size = torch.tensor(displacement.shape[2:], dtype=displacement.dtype, device=displacement.device)
    grid = 2 * points.to(displacement) / (size - 1).clamp(min=1) - 1  # align_corners=True normalisation
    # grid_sample wants the last spatial axis first, and a B P 1 (1) N grid
    grid = grid.flip(-1).view(points.shape[0], points.shape[1], *([1] * (n - 1)), n)
    out = F.grid_sample(displacement, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out.reshape(points.shape[0], n, points.shape[1]).transpose(1, 2)


def landmark_tre(
    fixed_points: torch.Tensor,
    moving_points: torch.Tensor,
    displacement: torch.Tensor | None = None,
    spacing_mm: Sequence[float] | None = None,
    units: str = "voxel",
) -> dict[str, Any]:
    """TRE of corresponding landmarks ``B P N`` (voxel indices): ``|x_f + u(x_f) - x_m|`` in mm, with ``u``
    interpolated at the fixed landmarks; without a field, the initial error ``|x_f - x_m|``."""
    if fixed_points.shape != moving_points.shape or fixed_points.ndim != 3:
        raise MedistillError(
            f"landmarks: fixed {tuple(fixed_points.shape)} and moving {tuple(moving_points.shape)} "
            "must both be B P N"
        )
    device = fixed_points.device if displacement is None else displacement.device
    fixed, moving = fixed_points.to(device, torch.float64), moving_points.to(device, torch.float64)
    s = _spacing(spacing_mm, fixed.shape[2], fixed)
    err_mm = (fixed - moving) * s
    if displacement is not None:
        u = sample_displacement(displacement, fixed).double()
        err_mm = err_mm + _to_mm(u, s, units, axis=-1)
    return _stats(list(err_mm.norm(dim=-1)))


def warped_label_dice(
    moving_labels: torch.Tensor,
    fixed_labels: torch.Tensor,
    displacement: torch.Tensor,
    labels: dict[str, int],
    spacing_mm: Sequence[float] | None = None,
    units: str = "voxel",
) -> dict[str, Any]:
    """Moving label maps ``B 1 *spatial`` warped by ``u`` (nearest neighbour, MONAI ``Warp``; outside is
    background) against the fixed labels, scored per structure by the shared segmentation rules
    (Dice, HD95 in mm, misses penalised, empty-vs-empty excluded) and summarised over the batch."""
    from monai.networks.blocks import Warp

    n = _check_field(displacement)
    expected = (displacement.shape[0], 1, *displacement.shape[2:])
    if moving_labels.shape != expected or fixed_labels.shape != expected:
        raise MedistillError(
            f"labels: moving {tuple(moving_labels.shape)} and fixed {tuple(fixed_labels.shape)} must be B 1 "
            f"{tuple(displacement.shape[2:])}"
        )
    s = _spacing(spacing_mm, n, displacement)
    u_vox = _to_mm(displacement, s, units) / s.view(1, -1, *([1] * n))
    with warnings.catch_warnings():  # MONAI says it falls back to torch's grid_sample: that is what we want
        warnings.simplefilter("ignore")
        warp = Warp(mode="nearest", padding_mode="zeros")
    warped = warp(moving_labels.to(u_vox.dtype), u_vox).round().long()
    spacing = [float(v) for v in s]
    cases = {
        str(b): score_structures(
            {name: warped[b, 0] == v for name, v in labels.items()},
            {name: fixed_labels[b, 0] == v for name, v in labels.items()},
            spacing_mm=spacing,
        )
        for b in range(warped.shape[0])
    }
    return summarise(cases)
