"""Registration metrics on analytic fields: identity, translation, scaling, a folding slab; 2D and 3D."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medistill.errors import MedistillError
from medistill.metrics.registration import (
    field_tre,
    jacobian_determinant,
    jacobian_stats,
    landmark_tre,
    sample_displacement,
    warped_label_dice,
)

SHAPES = {2: (12, 10), 3: (8, 10, 6)}


def coords(shape: tuple[int, ...], batch: int = 1) -> torch.Tensor:
    """``B N *spatial`` voxel index coordinates (channel k = index along axis k)."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij"))
    return grid[None].expand(batch, *grid.shape).clone()


@pytest.mark.parametrize("n", [2, 3])
def test_identity_has_det_one_no_folding_and_zero_tre(n: int) -> None:
    u = torch.zeros(2, n, *SHAPES[n], dtype=torch.float64)
    assert torch.allclose(jacobian_determinant(u), torch.ones(2, *SHAPES[n], dtype=torch.float64))
    j = jacobian_stats(u)
    assert j["folding_percent"] == [0.0, 0.0] and j["sd_log_jacobian"] == [0.0, 0.0]
    assert j["n_positive"] == j["n_voxels"] == [math.prod(SHAPES[n])] * 2
    t = field_tre(u, u)
    assert t["mean_mm"] == [0.0, 0.0] and t["p90_mm"] == [0.0, 0.0]


@pytest.mark.parametrize("n", [2, 3])
def test_translation_has_det_one_and_tre_of_its_length_in_mm(n: int) -> None:
    spacing = (2.0, 0.5, 3.0)[:n]
    shift = (1.5, -4.0, 2.0)[:n]  # voxels
    u = torch.tensor(shift, dtype=torch.float64).view(1, n, *[1] * n).expand(1, n, *SHAPES[n])
    assert torch.allclose(jacobian_determinant(u, spacing), torch.ones(1, *SHAPES[n], dtype=torch.float64))
    length_mm = math.sqrt(sum((d * s) ** 2 for d, s in zip(shift, spacing, strict=True)))  # 2D: 3.61 mm
    t = field_tre(u, torch.zeros_like(u), spacing_mm=spacing)
    for key in ("mean_mm", "median_mm", "p90_mm", "max_mm"):
        assert t[key][0] == pytest.approx(length_mm)
    u_mm = u * torch.tensor(spacing, dtype=torch.float64).view(1, n, *[1] * n)
    assert field_tre(u_mm, torch.zeros_like(u), spacing, units="mm")["mean_mm"][0] == pytest.approx(length_mm)
    # landmarks: fixed points mapped by the translation land on the moving points exactly
    fixed = torch.tensor([[[2.0, 3.0, 1.0][:n], [5.5, 4.25, 2.0][:n]]], dtype=torch.float64)
    moving = fixed + torch.tensor(shift, dtype=torch.float64)
    assert landmark_tre(fixed, moving, spacing_mm=spacing)["mean_mm"][0] == pytest.approx(length_mm)
    assert landmark_tre(fixed, moving, u, spacing_mm=spacing)["max_mm"][0] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("units", ["voxel", "mm"])
def test_linear_scaling_has_the_analytic_determinant(n: int, units: str) -> None:
    a, spacing = 0.3, (1.0, 2.5, 0.7)[:n]
    x = coords(SHAPES[n])
    if units == "mm":
        x = x * torch.tensor(spacing, dtype=torch.float64).view(1, n, *[1] * n)
    det = jacobian_determinant(a * x, spacing, units)
    assert torch.allclose(det, torch.full_like(det, (1 + a) ** n))  # borders too: the field is linear
    j = jacobian_stats(a * x, spacing, units)
    assert j["folding_percent"] == [0.0] and j["sd_log_jacobian"][0] == pytest.approx(0.0, abs=1e-12)
    # a linear field is sampled exactly between voxels: u(x) = a x at a fractional point
    p = torch.tensor([[[1.25, 2.5, 3.75][:n]]], dtype=torch.float64)
    expected = a * p * (torch.tensor(spacing, dtype=torch.float64) if units == "mm" else 1.0)
    assert torch.allclose(sample_displacement(a * x, p), expected)


@pytest.mark.parametrize("n", [2, 3])
def test_folding_slab_gives_its_fraction_of_non_positive_determinants(n: int) -> None:
    shape = SHAPES[n]
    x0 = coords(shape)[:, :1]
    lo, hi = 3.0, 6.0  # u_0 = -2 (clip(x0, lo, hi) - lo): slope -2 inside, continuous outside
    u = torch.cat([-2.0 * (x0.clamp(lo, hi) - lo), torch.zeros(1, n - 1, *shape, dtype=torch.float64)], 1)
    det, row = jacobian_determinant(u), x0[:, 0]
    inside = (row >= lo) & (row <= hi)  # the slab's rows 3..6, where x + u(x) runs backwards
    # central differences: slope -2 (det -1) on rows 4, 5; half of it (det 0) on the edge rows 3, 6
    assert torch.all(det[(row > lo) & (row < hi)] == -1.0)
    assert torch.all(det[(row == lo) | (row == hi)] == 0.0)
    assert torch.all(det[~inside] == 1.0)
    j = jacobian_stats(u)
    assert j["folding_percent"][0] == pytest.approx(100.0 * 4 / shape[0])  # 4 of the rows
    assert j["n_positive"][0] == int((~inside).sum()) and j["sd_log_jacobian"][0] == pytest.approx(0.0)
    assert "det J > 0" in j["sd_log_jacobian_over"]
    outside = jacobian_stats(u, mask=~inside[0])  # a shared mask for the batch
    assert outside["folding_percent"] == [0.0]


def test_sd_log_jacobian_of_a_field_with_two_known_determinants() -> None:
    x0 = coords((20, 6))[:, :1]
    # slope 1 on rows < 10 (det 2), 0 above (det 1): continuous piecewise-linear u_0
    u = torch.cat([x0.clamp(max=10.0), torch.zeros_like(x0)], 1)
    det = jacobian_determinant(u)[0]
    assert set(np.unique(np.round(det.numpy(), 6)).tolist()) == {1.0, 1.5, 2.0}  # 1.5 at the kink row
    logs = torch.log(det.flatten())
    assert jacobian_stats(u)["sd_log_jacobian"][0] == pytest.approx(float(logs.std(correction=0)))


def test_tre_inside_a_mask_and_percentiles() -> None:
    u = torch.zeros(1, 2, 10, 10, dtype=torch.float64)
    u[0, 0, :, :5] = torch.arange(10, dtype=torch.float64)[:, None]  # errors 0..9 voxels on the left half
    mask = torch.zeros(10, 10, dtype=torch.bool)
    mask[:, :5] = True
    t = field_tre(u, torch.zeros_like(u), spacing_mm=(2.0, 1.0), mask=mask)
    errors = 2.0 * np.repeat(np.arange(10.0), 5)
    assert t["n"] == [50] and t["mean_mm"][0] == pytest.approx(9.0) and t["max_mm"][0] == pytest.approx(18.0)
    assert t["median_mm"][0] == pytest.approx(9.0)
    assert t["p90_mm"][0] == pytest.approx(np.percentile(errors, 90))  # 16.2 mm


@pytest.mark.parametrize("n", [2, 3])
def test_warped_label_dice_recovers_a_translated_structure(n: int) -> None:
    shape = (12,) * n
    fixed = torch.zeros(1, 1, *shape)
    fixed[(0, 0, *[slice(3, 7)] * n)] = 1
    moving = torch.roll(fixed, 2, dims=2)  # the structure sits 2 voxels further along axis 0
    u = torch.zeros(1, n, *shape)
    u[:, 0] = 2.0  # warped(x) = moving(x + u): looks 2 voxels ahead, where the structure is
    s = warped_label_dice(moving, fixed, u, {"box": 1}, spacing_mm=(1.5,) * n)
    assert s["structures"]["box"]["dice"] == pytest.approx(1.0) and s["structures"]["box"]["hd95_mm"] == 0.0
    before = warped_label_dice(moving, fixed, torch.zeros_like(u), {"box": 1}, spacing_mm=(1.5,) * n)
    assert before["structures"]["box"]["dice"] == pytest.approx(0.5)  # 2 of 4 rows overlap
    assert before["structures"]["box"]["hd95_mm"] == pytest.approx(3.0)
    gone = warped_label_dice(moving, fixed, torch.full_like(u, 20.0), {"box": 1}, spacing_mm=(1.5,) * n)
    assert gone["overall"]["misses"] == 1 and gone["structures"]["box"]["dice"] == 0.0


def test_bad_fields_fail_with_one_clear_line() -> None:
    with pytest.raises(MedistillError, match="B 2 H W or B 3 D H W"):
        jacobian_determinant(torch.zeros(1, 3, 8, 8))
    with pytest.raises(MedistillError, match="spacing_mm"):
        jacobian_determinant(torch.zeros(1, 2, 8, 8), spacing_mm=(1.0, 1.0, 1.0))
    with pytest.raises(MedistillError, match="units"):
        field_tre(torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 8, 8), units="cm")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_metrics_run_on_the_gpu_and_agree_with_the_cpu() -> None:
    x = coords((16, 16, 16)).float()
    u = 0.2 * x + 0.5 * torch.sin(x / 3)
    cpu = jacobian_stats(u, (1.0, 1.5, 2.0))
    gpu = jacobian_stats(u.cuda(), (1.0, 1.5, 2.0))
    assert gpu["folding_percent"] == cpu["folding_percent"]
    assert gpu["sd_log_jacobian"][0] == pytest.approx(cpu["sd_log_jacobian"][0], rel=1e-4)
    assert field_tre(u.cuda(), torch.zeros_like(u).cuda())["mean_mm"][0] == pytest.approx(
        field_tre(u, torch.zeros_like(u))["mean_mm"][0], rel=1e-5
    )
