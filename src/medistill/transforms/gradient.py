"""Radiograph pre-processing of the DRR carpal-bone U-Net (seed D, spec D.2.2 and D.3): CLAHE, and the
"global gradient" and "local gradient" edge maps, as float maths on 2D images.

Source: ``data.py`` (``globalGradient``, ``localGradient``) and ``getCT.m`` (``adapthisteq``) of the
Nottingham carpal-bone project. Deviations, each fixing a defect the spec lists:

* **No uint8 overflow.** The original casts the Sobel magnitude (up to ~360) to uint8, so strong edges
  wrap around and turn dark. Here every step is float64; any input dtype (uint8, uint16, float) is first
  mapped to [0, 1] (integers by their dtype's range, floats by min-max), so a 16-bit radiograph and its
  8-bit export give the same result.
* **Saturation by percentile**, not the median of the *distinct* magnitude values (which depends on how
  many grey levels an image happens to use); then CLAHE with fixed parameters. The original chose CLAHE
  parameters by ``max(M) > 70`` / an unreachable ``> 100`` branch; we keep its first (reachable) branch:
  6x6 tiles, OpenCV clipLimit 8 (= 8/256 in scikit-image units, whose limit is a fraction of a tile).
* **Multi-level local gradient.** The original's ``nLevel = 2`` ran one level (scale 0.5) only; we sum
  the levels given (default full and half resolution). Local statistics use box/min/max filters (scipy)
  instead of an 81-pixel Python loop, with reflected borders instead of a zeroed 4-pixel frame.
* **Constant images** give zeros instead of a division by zero in the final min-max stretch.
* Every function takes and returns an *image*; labels never pass through here (they are never
  interpolated, resized or equalised: spec D.8.2).

CLAHE is scikit-image's ``equalize_adapthist``. MATLAB's ``adapthisteq`` defaults (8x8 tiles,
ClipLimit 0.01) map to ``kernel_size = size/8, clip_limit = 0.01``; the original applied them to every
DRR before any pre-processing, and so does :func:`prepare_input`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage
from skimage.exposure import equalize_adapthist
from skimage.transform import resize

from medistill.errors import MedistillError

#: scikit-image clip limits are fractions of a tile's pixels; OpenCV's are multiples of tile/nbins.
OPENCV_TO_SKIMAGE_CLIP = 1.0 / 256.0


def to_unit_float(image: np.ndarray) -> np.ndarray:
    """A 2D image of any real dtype as float64 in [0, 1].

    Integer images are divided by their dtype's range (so uint8 and uint16 versions of one picture agree
    up to quantisation); float images are min-max stretched; a constant image becomes zeros.
    """
    a = np.asarray(image)
    if a.ndim != 2:
        raise MedistillError(f"pre-processing takes one 2D grey image, got an array of shape {a.shape}")
    if a.dtype == np.bool_:
        return a.astype(np.float64)
    if np.issubdtype(a.dtype, np.integer):
        info = np.iinfo(a.dtype)
        return (a.astype(np.float64) - info.min) / (float(info.max) - info.min)
    if not np.issubdtype(a.dtype, np.floating):
        raise MedistillError(f"pre-processing takes a real-valued image, got dtype {a.dtype}")
    return stretch(a.astype(np.float64))


def stretch(a: np.ndarray) -> np.ndarray:
    """Min-max stretch to [0, 1]; non-finite values become 0; a constant image becomes zeros."""
    a = np.where(np.isfinite(a), a, 0.0).astype(np.float64)
    lo, hi = float(a.min()), float(a.max())
    if hi - lo <= 1e-12:
        return np.zeros_like(a)
    return (a - lo) / (hi - lo)


def clahe(image01: np.ndarray, tiles: int = 8, clip_limit: float = 0.01) -> np.ndarray:
    """CLAHE of a [0, 1] image with ``tiles x tiles`` contextual regions (scikit-image), float64 in [0, 1]."""
    h, w = image01.shape
    kernel = (max(2, h // tiles), max(2, w // tiles))
    return equalize_adapthist(np.clip(image01, 0.0, 1.0), kernel_size=kernel, clip_limit=clip_limit)


def gradient_magnitude(image: np.ndarray) -> np.ndarray:
    """``sqrt(Gx^2 + Gy^2)`` with the central difference ``[-1, 0, 1]`` (OpenCV Sobel ksize=1), float64."""
    a = np.asarray(image, dtype=np.float64)
    gx = ndimage.correlate1d(a, [-1.0, 0.0, 1.0], axis=1, mode="reflect")
    gy = ndimage.correlate1d(a, [-1.0, 0.0, 1.0], axis=0, mode="reflect")
    return np.hypot(gx, gy)


def global_gradient(
    image: np.ndarray,
    saturation_percentile: float = 90.0,
    tiles: int = 6,
    clip_limit: float = 8.0 * OPENCV_TO_SKIMAGE_CLIP,
) -> np.ndarray:
    """Contrast-equalised edge strength with saturated strong edges (spec D.3.1, fixed), in [0, 1].

    Steps: image -> [0, 1]; central-difference gradient magnitude; clip at the
    ``saturation_percentile``-th percentile of the magnitude and divide by it; CLAHE; min-max stretch.
    """
    m = gradient_magnitude(to_unit_float(image))
    t = float(np.percentile(m, saturation_percentile))
    if t <= 0:
        t = float(m.max())
    if t <= 0:  # no edges at all
        return np.zeros_like(m)
    return stretch(clahe(np.minimum(m, t) / t, tiles=tiles, clip_limit=clip_limit))


def local_gradient(
    image: np.ndarray,
    scales: Sequence[float] = (1.0, 0.5),
    window: int = 9,
    std_fraction: float = 0.2,
) -> np.ndarray:
    """Gradient magnitude normalised by its local min/max, homogeneous regions suppressed (spec D.3.2,
    vectorised and truly multi-level), in [0, 1].

    Per scale: resample the image (area-averaged), gradient magnitude ``G``; in every ``window`` x
    ``window`` neighbourhood ``W`` the output is ``(G - min W) / (max W - min W)`` where the local standard
    deviation of ``G`` is at least ``std_fraction * std(G)``, else 0. Levels are resized back (linear) and
    summed, then min-max stretched.
    """
    a = to_unit_float(image)
    if not scales or any(s <= 0 or s > 1 for s in scales):
        raise MedistillError(f"local_gradient scales must lie in (0, 1], got {tuple(scales)}")
    total = np.zeros_like(a)
    for s in scales:
        shape = (max(window, round(a.shape[0] * s)), max(window, round(a.shape[1] * s)))
        level = a if shape == a.shape else resize(a, shape, order=1, anti_aliasing=True)
        g = gradient_magnitude(level)
        mean = ndimage.uniform_filter(g, window, mode="reflect")
        var = np.maximum(ndimage.uniform_filter(g * g, window, mode="reflect") - mean * mean, 0.0)
        lo = ndimage.minimum_filter(g, window, mode="reflect")
        hi = ndimage.maximum_filter(g, window, mode="reflect")
        busy = np.sqrt(var) >= std_fraction * float(g.std())
        out = np.where(busy & (hi > lo), (g - lo) / np.where(hi > lo, hi - lo, 1.0), 0.0)
        total += out if shape == a.shape else resize(out, a.shape, order=1, anti_aliasing=False)
    return stretch(total)


def no_preprocessing(image: np.ndarray) -> np.ndarray:
    """The "origin" model's input: the image itself in [0, 1]."""
    return to_unit_float(image)


#: Pre-processing methods by config name (``none`` is the original's "origin" model).
PREPROCESSING: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "none": no_preprocessing,
    "global_gradient": global_gradient,
    "local_gradient": local_gradient,
}


def prepare_input(image01: np.ndarray, method: str, equalise: bool = True) -> np.ndarray:
    """Network input (float32 ``H W`` in [0, 1]) from a windowed radiograph in [0, 1]: CLAHE as the original
    applied to every DRR (MATLAB ``adapthisteq`` defaults), then pre-processing ``method``."""
    if method not in PREPROCESSING:
        raise MedistillError(f"unknown pre-processing {method!r}; choose one of {', '.join(PREPROCESSING)}")
    x = clahe(np.clip(np.asarray(image01, dtype=np.float64), 0.0, 1.0)) if equalise else image01
    return PREPROCESSING[method](np.asarray(x, dtype=np.float64)).astype(np.float32)
