"""Image-quality metrics in HU for CT synthesis and metal artifact reduction, stating their window.

MAE and RMSE are taken on the raw HU values (MONAI ``MAEMetric`` / ``RMSEMetric``). PSNR and SSIM
depend on a data range, so both images are first **clipped to a stated HU window** and the range is
``hi - lo`` of that window (MONAI ``PSNRMetric(max_val=range)`` and ``compute_ssim_and_cs``, the function
behind ``SSIMMetric``); the returned dict says which window and range were used. Every metric can be
restricted to a boolean mask (body, bone, a band around metal: :func:`band_around`).

SSIM inside a mask: the local SSIM map is computed over the whole image (Gaussian window, Wang et al.
2004, IEEE TIP 13(4)) and averaged over the mask's voxels. MONAI's map has no padding, so it covers the
voxels at least ``(win_size - 1) / 2`` from the border; mask voxels closer to the border are not counted
(``ssim_voxels`` in the result says how many were).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.metrics import MAEMetric, PSNRMetric, RMSEMetric
from monai.metrics.regression import compute_ssim_and_cs
from scipy.ndimage import distance_transform_edt

from medistill.errors import MedistillError

DEFAULT_WINDOW_HU = (-1000.0, 2000.0)


def _tensor(x: np.ndarray | torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return (
        x.detach().to(dtype) if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x), dtype=dtype)
    )


def band_around(
    mask: np.ndarray | torch.Tensor, distance_mm: float, spacing_mm: Sequence[float]
) -> np.ndarray:
    """Voxels outside ``mask`` within ``distance_mm`` (Euclidean, in mm with ``spacing_mm`` per axis) of it:
    the dilation of the mask by a ball of that radius, minus the mask itself (e.g. the streak zone
    around metal, where the metal voxels themselves carry no tissue value to compare)."""
    m = np.asarray(mask.detach().cpu() if isinstance(mask, torch.Tensor) else mask, dtype=bool)
    if len(spacing_mm) != m.ndim:
        raise MedistillError(f"band_around: spacing_mm {list(spacing_mm)} does not match a {m.ndim}D mask")
    if distance_mm < 0:
        raise MedistillError(f"band_around: distance_mm must be >= 0, got {distance_mm}")
    if not m.any():
        return np.zeros_like(m)
    dist = distance_transform_edt(~m, sampling=list(spacing_mm))  # mm to the nearest mask voxel
    return (dist <= distance_mm) & ~m


def _ssim_map(
    pred: torch.Tensor,
    target: torch.Tensor,
    data_range: float,
    spatial_dims: int,
    win_size: int,
    sigma: float,
) -> torch.Tensor:
    """MONAI's SSIM map of ``B 1 *spatial`` images (valid region only: each side loses ``win_size // 2``)."""
    small = [s for s in pred.shape[2:] if s < win_size]
    if small:
        raise MedistillError(
            f"ssim: image {tuple(pred.shape[2:])} is smaller than the {win_size}-voxel window; "
            "use a smaller win_size or ssim_dims=2"
        )
    ssim, _ = compute_ssim_and_cs(
        pred.float(),
        target.float(),
        spatial_dims=spatial_dims,
        kernel_size=[win_size] * spatial_dims,
        kernel_sigma=[sigma] * spatial_dims,
        data_range=data_range,
    )
    return ssim


def image_quality(
    pred_hu: np.ndarray | torch.Tensor,
    target_hu: np.ndarray | torch.Tensor,
    window_hu: Sequence[float] = DEFAULT_WINDOW_HU,
    mask: np.ndarray | torch.Tensor | None = None,
    ssim_dims: int | None = None,
    slice_axis: int = -1,
    win_size: int = 11,
    sigma: float = 1.5,
) -> dict[str, Any]:
    """MAE, RMSE (HU), PSNR (dB) and SSIM of ``pred_hu`` against ``target_hu``, optionally inside ``mask``.

    Args:
        pred_hu, target_hu: one image in HU, ``H W`` or ``X Y Z`` (same shape).
        window_hu: ``(lo, hi)``; both images are clipped to it for PSNR and SSIM, whose data range is
            ``hi - lo``. MAE and RMSE use the unclipped HU values.
        mask: boolean, same shape; all metrics only see its voxels (SSIM: map averaged inside it).
        ssim_dims: 2 for slice-wise SSIM of a 3D volume (slices along ``slice_axis``; the last axis is
            axial in NIfTI voxel order), default the image's own dimension.
        win_size, sigma: the Gaussian SSIM window (voxels), 11 and 1.5 as in Wang et al.

    Returns ``{"mae_hu", "rmse_hu", "psnr_db", "ssim", "window_hu", "data_range_hu", "n_voxels",
    "ssim_voxels", "clipped_for", "ssim_dims", "ssim_window"}``. PSNR is ``inf`` for identical images.
    """
    p, t = _tensor(pred_hu), _tensor(target_hu)
    if p.shape != t.shape:
        raise MedistillError(
            f"image_quality: prediction shape {tuple(p.shape)} differs from target {tuple(t.shape)}"
        )
    if p.ndim not in (2, 3):
        raise MedistillError(f"image_quality: expected a 2D or 3D image, got shape {tuple(p.shape)}")
    lo, hi = (float(v) for v in window_hu)
    if not hi > lo:
        raise MedistillError(f"image_quality: window_hu must be (lo, hi) with hi > lo, got {list(window_hu)}")
    m = torch.ones_like(p, dtype=torch.bool) if mask is None else _tensor(mask, torch.bool).to(p.device)
    if m.shape != p.shape:
        raise MedistillError(
            f"image_quality: mask shape {tuple(m.shape)} differs from the image {tuple(p.shape)}"
        )
    if not m.any():
        raise MedistillError("image_quality: the mask is empty; no voxel to compare")
    data_range = hi - lo
    pc, tc = p.clamp(lo, hi), t.clamp(lo, hi)

    def inside(a: torch.Tensor) -> torch.Tensor:
        return a[m][None]  # 1 x N: MONAI's regression metrics average over all but the batch axis

    out: dict[str, Any] = {
        "mae_hu": float(MAEMetric()(inside(p), inside(t)).item()),
        "rmse_hu": float(RMSEMetric()(inside(p), inside(t)).item()),
        "psnr_db": float(PSNRMetric(max_val=data_range)(inside(pc), inside(tc)).item()),
    }

    dims = p.ndim if ssim_dims is None else ssim_dims
    if dims == p.ndim:
        pb, tb, mb = pc[None, None], tc[None, None], m[None]
    elif dims == 2 and p.ndim == 3:  # slices become the batch: ``S 1 H W``
        pb, tb, mb = (torch.movedim(a, slice_axis, 0) for a in (pc, tc, m))
        pb, tb = pb[:, None], tb[:, None]
    else:
        raise MedistillError(f"image_quality: ssim_dims={ssim_dims} does not fit a {p.ndim}D image")
    ssim_map = _ssim_map(pb, tb, data_range, dims, win_size, sigma)[:, 0]
    r = win_size // 2
    core = mb[(slice(None), *[slice(r, s - r) for s in mb.shape[1:]])]  # mask voxels the map covers
    out["ssim"] = float(ssim_map[core].double().mean().item()) if core.any() else float("nan")
    return out | {
        "window_hu": [lo, hi],
        "data_range_hu": data_range,
        "n_voxels": int(m.sum().item()),
        "ssim_voxels": int(core.sum().item()),
        "clipped_for": ["psnr_db", "ssim"],
        "ssim_dims": dims,
        "ssim_window": {"type": "gaussian", "size": win_size, "sigma": sigma},
    }
