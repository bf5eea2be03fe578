"""Pre-processing of seed D (global / local gradient, CLAHE) with the original's defects fixed."""

from __future__ import annotations

import numpy as np
import pytest

from medistill.errors import MedistillError
from medistill.transforms.gradient import (
    PREPROCESSING,
    clahe,
    global_gradient,
    gradient_magnitude,
    local_gradient,
    prepare_input,
    to_unit_float,
)


def _phantom(n: int = 64, ramp: float = 0.1) -> np.ndarray:
    """A background ramp, a bright disc with a hard edge and a faint square: float in [0, 1]."""
    y, x = np.mgrid[0:n, 0:n] / (n - 1)
    img = 0.2 + ramp * x
    img[(x - 0.35) ** 2 + (y - 0.4) ** 2 < 0.04] = 1.0
    img[40:52, 40:52] += 0.05
    return np.clip(img, 0, 1)


def test_gradient_magnitude_is_the_central_difference() -> None:
    ramp = np.tile(np.arange(10, dtype=float) * 3.0, (6, 1))  # d/dx = 3 per pixel
    g = gradient_magnitude(ramp)
    assert np.allclose(g[:, 1:-1], 6.0)  # [-1, 0, 1] spans two pixels, like OpenCV Sobel ksize=1


def test_global_gradient_does_not_overflow_on_strong_diagonal_edges() -> None:
    # a diagonal 0 -> 255 edge has |G| = 255 * sqrt(2) = 360 > 255: the original's uint8 cast wrapped it
    # to 105, i.e. the strongest edge came out darker than weak ones. Float maths keeps it the brightest.
    img8 = np.zeros((48, 48), np.uint8)
    img8[np.add.outer(np.arange(48), np.arange(48)) > 48] = 255
    img8[:, :6] = np.arange(6, dtype=np.uint8)[None] * 8  # a weak ramp elsewhere
    m = gradient_magnitude(img8.astype(float))
    assert m.max() > 255  # the case that overflowed
    out = global_gradient(img8)
    edge = m > 300
    assert out[edge].min() >= out[~edge].max() - 1e-9  # strong edges are saturated at the top
    assert out.min() >= 0.0 and out.max() == pytest.approx(1.0)


def test_integer_depth_and_float_scale_do_not_change_the_result() -> None:
    img = _phantom(ramp=0.0)  # piecewise constant: 8-bit quantisation changes no edge
    as16 = np.round(img * 65535).astype(np.uint16)
    as8 = np.round(img * 255).astype(np.uint8)
    for fn in (global_gradient, local_gradient):
        a, b = fn(as16), fn(as8)
        assert a.dtype == np.float64 and 0.0 <= a.min() and a.max() <= 1.0
        assert np.mean(np.abs(a - b)) < 0.02  # 8- vs 16-bit: the same picture, the same edges
        full = _phantom() * 0.9 + 0.05  # min-max stretch makes float inputs scale-invariant
        assert np.allclose(fn(full), fn(full * 1000.0 - 7.0), atol=1e-9)


def test_constant_image_gives_zeros_not_nan() -> None:
    flat = np.full((32, 32), 7, np.uint16)
    for fn in (global_gradient, local_gradient):  # no edges: all zero (the original divided by zero)
        out = fn(flat)
        assert np.all(np.isfinite(out)) and np.all(out == 0)
    assert np.allclose(PREPROCESSING["none"](flat), 7 / 65535)  # integers scale by their dtype range
    assert np.all(PREPROCESSING["none"](np.full((8, 8), 3.5)) == 0)  # a constant float has no range


def test_clahe_is_applied() -> None:
    low = 0.45 + 0.05 * _phantom()  # a low-contrast picture in [0.46, 0.5]
    eq = clahe(low)
    assert np.ptp(eq) > 5 * np.ptp(low)  # local histogram equalisation spreads the grey levels
    img = _phantom()
    assert not np.allclose(prepare_input(img, "none"), prepare_input(img, "none", equalise=False))


def test_local_gradient_matches_the_original_loop_and_suppresses_flat_regions() -> None:
    rng = np.random.default_rng(0)
    img = _phantom(40) + rng.normal(0, 0.01, (40, 40))
    out = local_gradient(img, scales=(1.0,))
    # the original's per-pixel 9x9 loop, on interior pixels, before the final min-max stretch
    g = gradient_magnitude(to_unit_float(img))
    t = g.std() * 0.2
    ref = np.zeros_like(g)
    for r in range(4, 36):
        for c in range(4, 36):
            w = g[r - 4 : r + 5, c - 4 : c + 5]
            if w.std() >= t and w.max() > w.min():
                ref[r, c] = (g[r, c] - w.min()) / (w.max() - w.min())
    raw = out * ref[4:36, 4:36].max() / max(out[4:36, 4:36].max(), 1e-12)
    assert np.allclose(raw[4:36, 4:36], ref[4:36, 4:36], atol=1e-6)
    flat = np.full((40, 40), 0.5)
    flat[:, 20:] = 0.6
    edges = local_gradient(flat, scales=(1.0,))
    assert edges[:, :10].max() == 0.0 and edges[:, 19:21].min() > 0.5  # flat: zero; edge: high


def test_local_gradient_sums_several_levels() -> None:
    img = _phantom()
    one, two = local_gradient(img, scales=(0.5,)), local_gradient(img, scales=(1.0, 0.5))
    assert one.shape == two.shape == img.shape
    assert not np.allclose(one, two)  # the original's "multi-level" loop ran one level only


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(MedistillError, match="2D grey image"):
        global_gradient(np.zeros((8, 8, 3)))
    with pytest.raises(MedistillError, match="unknown pre-processing"):
        prepare_input(np.zeros((8, 8)), "sobel")
    with pytest.raises(MedistillError, match="scales"):
        local_gradient(np.zeros((16, 16)), scales=(2.0,))
