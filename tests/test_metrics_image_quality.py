"""Image-quality metrics in HU against hand-computed cases: offsets, windows, masks, bands."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.metrics import SSIMMetric

from medistill.errors import MedistillError
from medistill.metrics.image_quality import band_around, image_quality


def phantom(shape: tuple[int, ...] = (32, 32), seed: int = 0) -> np.ndarray:
    """Soft tissue with a bone disk and noise (HU): structure for SSIM to see."""
    g = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.arange(n) - n / 2 for n in shape], indexing="ij")
    r = np.sqrt(sum(a**2 for a in grid))
    return np.where(r < shape[0] / 4, 800.0, 40.0) + g.normal(0, 20, shape)


def test_constant_offset_of_10_hu() -> None:
    ref = phantom()
    q = image_quality(ref + 10.0, ref, window_hu=(-1000, 2000))
    assert q["mae_hu"] == pytest.approx(10.0) and q["rmse_hu"] == pytest.approx(10.0)
    assert q["psnr_db"] == pytest.approx(20 * math.log10(3000 / 10))  # 49.54 dB
    assert q["window_hu"] == [-1000.0, 2000.0] and q["data_range_hu"] == 3000.0
    assert q["n_voxels"] == ref.size and set(q["clipped_for"]) == {"psnr_db", "ssim"}
    assert 0.9 < q["ssim"] < 1.0  # a 10 HU shift on a 3000 HU range barely changes luminance


def test_ssim_of_an_image_with_itself_is_one_in_2d_3d_and_slicewise() -> None:
    for shape, dims in (((32, 32), None), ((16, 16, 16), None), ((24, 24, 5), 2)):
        ref = phantom(shape)
        q = image_quality(torch.from_numpy(ref), ref, ssim_dims=dims, win_size=7)
        assert q["ssim"] == pytest.approx(1.0, abs=1e-6) and q["mae_hu"] == 0.0 and math.isinf(q["psnr_db"])


def test_unmasked_ssim_equals_monai_ssim_metric_on_the_clipped_images() -> None:
    ref, noisy = phantom(seed=0), phantom(seed=1)
    lo, hi = -200.0, 400.0
    q = image_quality(noisy, ref, window_hu=(lo, hi))
    monai = SSIMMetric(spatial_dims=2, data_range=hi - lo)(
        torch.from_numpy(np.clip(noisy, lo, hi))[None, None].float(),
        torch.from_numpy(np.clip(ref, lo, hi))[None, None].float(),
    )
    assert q["ssim"] == pytest.approx(float(monai), abs=1e-5)
    assert q["ssim"] < 0.99


def test_window_clipping_changes_psnr_by_hand() -> None:
    ref = np.zeros((16, 16))
    pred = ref.copy()
    pred[:4] = 2500.0  # 64 of 256 pixels, above the window's top of 2000 HU
    q = image_quality(pred, ref, window_hu=(-1000, 2000))
    assert q["mae_hu"] == pytest.approx(2500 * 0.25)  # MAE / RMSE see raw HU
    assert q["rmse_hu"] == pytest.approx(math.sqrt(2500**2 * 0.25))
    mse_clipped = 2000**2 * 0.25
    assert q["psnr_db"] == pytest.approx(10 * math.log10(3000**2 / mse_clipped))
    narrow = image_quality(pred, ref, window_hu=(-160, 240))  # error clipped to 240 HU on a 400 HU range
    assert narrow["psnr_db"] == pytest.approx(10 * math.log10(400**2 / (240**2 * 0.25)))


def test_masked_metrics_only_see_the_mask() -> None:
    ref = phantom((40, 40))
    pred = ref.copy()
    pred[:, 20:] += np.random.default_rng(3).normal(0, 300, (40, 20))  # right half corrupted
    left = np.zeros(ref.shape, bool)
    left[:, :14] = True  # further than 5 px (half an 11 px window) from the corruption
    q = image_quality(pred, ref, mask=left)
    assert q["mae_hu"] == 0.0 and math.isinf(q["psnr_db"]) and q["n_voxels"] == 40 * 14
    assert q["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert q["ssim_voxels"] == (40 - 10) * (14 - 5)  # the map's valid region inside the mask
    right = image_quality(pred, ref, mask=~left)
    assert right["mae_hu"] > 100 and right["ssim"] < 0.9


def test_band_around_a_mask_in_mm_excludes_the_mask() -> None:
    metal = np.zeros((9, 9), bool)
    metal[4, 4] = True
    band = band_around(metal, 2.0, spacing_mm=(1.0, 2.0))
    # rows +-1, +-2 (1 and 2 mm) and columns +-1 (2 mm); the diagonal (1, 1) is sqrt(5) mm away
    assert band.sum() == 6 and not band[4, 4] and band[2, 4] and band[4, 5] and not band[3, 5]
    assert band_around(np.zeros((4, 4, 4), bool), 5.0, (1.0, 1.0, 1.0)).sum() == 0
    with pytest.raises(MedistillError, match="spacing_mm"):
        band_around(metal, 2.0, (1.0, 1.0, 1.0))


def test_bad_inputs_fail_with_one_clear_line() -> None:
    ref = phantom()
    with pytest.raises(MedistillError, match="shape"):
        image_quality(ref, ref[:16])
    with pytest.raises(MedistillError, match="mask is empty"):
        image_quality(ref, ref, mask=np.zeros(ref.shape, bool))
    with pytest.raises(MedistillError, match="hi > lo"):
        image_quality(ref, ref, window_hu=(100, 100))
    with pytest.raises(MedistillError, match="smaller than the 11-voxel window"):
        image_quality(phantom((8, 8)), phantom((8, 8)))
