"""Exact line integrals through a voxel volume by Siddon's method, in NumPy: the yardstick for the DRR.

Why a separate, slow implementation: the fast renderer (:mod:`medistill.physics.drr`) interpolates, so it
must be checked against something that does not. Siddon (Med. Phys. 12(2), 1985) treats each voxel as a
constant box and sums ``mu x (exact chord length)`` over every box a ray crosses; it shares no code with
the renderer (NumPy, float64, plane crossings instead of resampling). Used by the tests and the benchmark.
"""

from __future__ import annotations

import numpy as np


def siddon_line_integrals(
    mu_per_mm: np.ndarray,
    affine: np.ndarray,
    source_mm: np.ndarray,
    through_mm: np.ndarray,
    *,
    chunk: int = 512,
) -> np.ndarray:
    """Integral of ``mu`` (mu x mm) along the half-lines from ``source_mm`` through each ``through_mm``.

    Args:
        mu_per_mm: (I J K) attenuation, voxel ``(i, j, k)`` a box of centre ``affine @ (i, j, k, 1)``.
        affine: (4 4) voxel index -> world mm.
        source_mm: (3) ray origin in world mm, outside the volume.
        through_mm: (N 3) a second point on each ray (e.g. the detector pixel centres).
    Returns:
        (N) line integrals, float64.
    """
    mu = np.asarray(mu_per_mm, dtype=np.float64)
    affine = np.asarray(affine, dtype=np.float64)
    inv = np.linalg.inv(affine)
    shape = np.array(mu.shape)
    s = inv[:3, :3] @ np.asarray(source_mm, dtype=np.float64) + inv[:3, 3]
    through = np.asarray(through_mm, dtype=np.float64).reshape(-1, 3)
    t = through @ inv[:3, :3].T + inv[:3, 3]
    d = t - s
    # stretch each ray so that alpha in [0, 1] spans the whole volume from the source on
    reach = np.linalg.norm(shape) + np.linalg.norm(s - (shape - 1) / 2.0) + 2.0
    d = d / np.linalg.norm(d, axis=1, keepdims=True) * reach
    length_mm = np.linalg.norm(d @ affine[:3, :3].T, axis=1)
    planes = [np.arange(n + 1, dtype=np.float64) - 0.5 for n in shape]
    out = np.empty(len(d))
    for lo in range(0, len(d), chunk):
        dc = d[lo : lo + chunk]
        alphas = [np.zeros((len(dc), 2)), np.ones((len(dc), 1))]
        for axis in range(3):
            with np.errstate(divide="ignore", invalid="ignore"):
                a = (planes[axis][None, :] - s[axis]) / dc[:, axis : axis + 1]
            alphas.append(np.where((a > 0) & (a < 1), a, np.nan))
        a = np.sort(np.concatenate(alphas, axis=1), axis=1)  # NaNs sort last
        step = np.nan_to_num(np.diff(a, axis=1))
        mid = (a[:, 1:] + a[:, :-1]) / 2.0
        idx = np.rint(s[None, None, :] + np.nan_to_num(mid)[..., None] * dc[:, None, :]).astype(np.int64)
        inside = np.all((idx >= 0) & (idx < shape), axis=-1) & (step > 0)
        idx = np.where(inside[..., None], idx, 0)
        values = mu[idx[..., 0], idx[..., 1], idx[..., 2]] * inside
        out[lo : lo + chunk] = (values * step).sum(axis=1) * length_mm[lo : lo + chunk]
    return out
