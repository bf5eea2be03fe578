"""DRR renderer vs analytic answers and an exact Siddon reference; gradients vs finite differences."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from example_data import require_example
from medistill.errors import MedistillError
from medistill.physics.attenuation import hu_to_mu
from medistill.physics.drr import DRRRenderer, _warp_label_counts, banded_lerp, beer_lambert, display_image
from medistill.physics.drr_reference import siddon_line_integrals
from medistill.physics.geometry import (
    Detector,
    Pose,
    pixel_directions,
    random_poses,
    view_pose,
    volume_centre_mm,
)

METHODS = ["joseph", "shear-warp"]
AFFINE = torch.tensor(
    [[-1.0, 0, 0, 3.0], [0, 1.2, 0, -7.0], [0, 0, 1.5, 11.0], [0, 0, 0, 1]], dtype=torch.float64
)


def _rays(det: Detector, pose: Pose) -> tuple[np.ndarray, np.ndarray]:
    """(source (3), pixel directions (H*W 3)) in world mm."""
    return pose.source_mm[0].numpy(), pixel_directions(det, pose)[0].reshape(-1, 3).numpy()


def _mean_relative_error(got: np.ndarray, ref: np.ndarray, floor: float) -> float:
    keep = ref > floor
    return float(np.mean(np.abs(got[keep] - ref[keep]) / ref[keep]))


def test_hu_to_mu_water_air_and_bone_split() -> None:
    hu = torch.tensor([-1000.0, -2000.0, 0.0, 1000.0])
    assert hu_to_mu(hu, 0.02).tolist() == pytest.approx([0.0, 0.0, 0.02, 0.04])
    assert hu_to_mu(hu, 0.02, bone_threshold_hu=500, bone_weight=2.0).tolist() == pytest.approx(
        [0, 0, 0.02, 0.08]
    )


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("view", ["ap", "lateral"])
def test_uniform_box_line_integral_is_mu_times_chord(method: str, view: str) -> None:
    """Rays through the two faces perpendicular to the slice axis: integral = mu x chord length, exactly."""
    mu_value = 0.02
    shape = (30, 24, 20)
    mu = torch.full(shape, mu_value, dtype=torch.float64)
    pose = random_poses(
        1,
        view,
        volume_centre_mm(shape, AFFINE),
        300.0,
        angle_range_deg=(8, 8, 8),
        generator=torch.Generator().manual_seed(2),
    )
    det = Detector(40, 40, (2.0, 2.0), 500.0)
    got = DRRRenderer(mu, AFFINE, method=method).line_integrals(det, pose)[0].reshape(-1).numpy()
    source, dirs = _rays(det, pose)
    inv = np.linalg.inv(AFFINE.numpy())
    s = inv[:3, :3] @ source + inv[:3, 3]
    d = dirs @ inv[:3, :3].T
    axis = 1 if view == "ap" else 0
    n = shape[axis]
    enter, leave = [(plane - s[axis]) / d[:, axis] for plane in (-0.5, n - 0.5)]
    inside = np.ones(len(d), bool)
    for other in (a for a in range(3) if a != axis):
        for lam in (enter, leave):
            x = s[other] + lam * d[:, other]
            inside &= (x > 1.0) & (x < shape[other] - 2.0)
    chord_mm = np.abs(leave - enter) * np.linalg.norm(dirs, axis=1)
    assert inside.sum() > 50
    np.testing.assert_allclose(got[inside], mu_value * chord_mm[inside], rtol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_ball_line_integral_is_mu_times_chord(method: str) -> None:
    """Partial-volume ball, R = 15 mm: integral = mu x 2 sqrt(R^2 - d^2), d the ray-to-centre distance."""
    n, radius, mu_value = 40, 15.0, 0.02
    sub = (np.arange(4 * n) + 0.5) / 4 - 0.5  # 4x supersampling per axis, 1 mm voxels
    x, y, z = np.meshgrid(sub, sub, sub, indexing="ij", sparse=True)
    centre = (n - 1) / 2
    fine = ((x - centre) ** 2 + (y - centre) ** 2 + (z - centre) ** 2) < radius**2
    fraction = fine.reshape(n, 4, n, 4, n, 4).mean(axis=(1, 3, 5))
    mu = torch.tensor(fraction * mu_value)
    affine = torch.eye(4, dtype=torch.float64)
    centre_mm = volume_centre_mm((n, n, n), affine)
    pose = random_poses(
        1,
        "ap",
        centre_mm,
        250.0,
        angle_range_deg=(20, 20, 0),
        shift_range_mm=(0, 0, 0),
        generator=torch.Generator().manual_seed(5),
    )
    det = Detector(48, 48, (1.5, 1.5), 450.0)
    got = DRRRenderer(mu, affine, method=method).line_integrals(det, pose)[0].reshape(-1).numpy()
    source, dirs = _rays(det, pose)
    unit = dirs / np.linalg.norm(dirs, axis=1, keepdims=True)
    to_centre = centre_mm.numpy() - source
    dist = np.linalg.norm(to_centre - (unit @ to_centre)[:, None] * unit, axis=1)
    keep = dist < 0.8 * radius
    chord = 2 * np.sqrt(radius**2 - dist[keep] ** 2)
    assert keep.sum() > 100
    assert np.mean(np.abs(got[keep] - mu_value * chord) / (mu_value * chord)) < 0.005


def test_siddon_reference_is_exact_on_a_box() -> None:
    mu = np.full((10, 12, 8), 0.5)
    affine = np.diag([2.0, 1.0, 3.0, 1.0])
    source = np.array([9.0, -100.0, 10.5])
    through = np.array([[9.0, 0.0, 10.5], [12.0, 0.0, 9.0]])
    got = siddon_line_integrals(mu, affine, source, through)
    # first ray: straight along y through 12 voxels of 1 mm
    assert got[0] == pytest.approx(0.5 * 12.0)
    direction = through[1] - source
    chord = 12.0 / direction[1] * np.linalg.norm(direction)
    assert got[1] == pytest.approx(0.5 * chord)


@pytest.fixture(scope="module")
def chest_mu() -> tuple[torch.Tensor, torch.Tensor]:
    from medistill.io.images import read_image

    image = read_image(require_example("chest-ct") / "cxr.nii.gz")
    return hu_to_mu(torch.from_numpy(np.asarray(image.array, dtype=np.float32))), torch.tensor(image.affine)


@pytest.mark.slow
def test_chest_ct_matches_siddon_within_one_percent(chest_mu: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Mean relative error < 1 % against exact Siddon at 500 random pixels of 200x200 DRRs (rays through
    the body, reference > 1 mu x mm), for AP, lateral and 5 random poses; shear-warp on two of them."""
    mu, affine = chest_mu
    centre = volume_centre_mm(tuple(mu.shape), affine)
    det = Detector(200, 200, (2.0, 2.0), 1020.0)
    randoms = random_poses(
        5, "ap", centre, 850.0, angle_range_deg=(30, 15, 10), generator=torch.Generator().manual_seed(0)
    )
    poses = [view_pose("ap", centre, 850.0), view_pose("lateral", centre, 850.0)] + [
        randoms[i] for i in range(5)
    ]
    renderers = {m: DRRRenderer(mu, affine, method=m) for m in METHODS}
    pixels = np.random.default_rng(0).choice(200 * 200, 500, replace=False)
    for index, pose in enumerate(poses):
        source, dirs = _rays(det, pose)
        ref = siddon_line_integrals(mu.numpy(), affine.numpy(), source, source + dirs[pixels])
        for method in METHODS if index in (0, 3) else ["joseph"]:
            with torch.no_grad():
                got = renderers[method].line_integrals(det, pose)[0].reshape(-1)[pixels].numpy()
            assert _mean_relative_error(got, ref, floor=1.0) < 0.01, (index, method)


def _blob(n: int = 20) -> torch.Tensor:
    grid = torch.arange(n, dtype=torch.float64) - (n - 1) / 2
    x, y, z = torch.meshgrid(grid, grid * 1.3, grid - 1.5, indexing="ij")
    return 0.03 * torch.exp(-(x**2 + y**2 + z**2) / 18.0) + 0.01 * torch.exp(
        -((x - 4) ** 2 + y**2 + z**2) / 4.0
    )


@pytest.mark.parametrize("method", METHODS)
def test_pose_gradient_matches_finite_differences(method: str) -> None:
    mu = _blob()
    centre = volume_centre_mm(tuple(mu.shape), AFFINE)
    det = Detector(24, 24, (2.0, 2.0), 400.0)
    renderer = DRRRenderer(mu, AFFINE, method=method)
    weights = torch.rand(24, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def loss(params: torch.Tensor) -> torch.Tensor:
        pose = view_pose("ap", centre, 250.0, angles_rad=params[None, :3], shift_mm=params[None, 3:])
        return (renderer.line_integrals(det, pose)[0] * weights).sum()

    params = torch.tensor([0.05, -0.04, 0.03, 1.0, -2.0, 0.5], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(loss(params), params)
    eps = torch.tensor([1e-4] * 3 + [1e-2] * 3, dtype=torch.float64)
    numeric = torch.stack(
        [
            (
                loss(params.detach() + eps[i] * torch.eye(6, dtype=torch.float64)[i])
                - loss(params.detach() - eps[i] * torch.eye(6, dtype=torch.float64)[i])
            )
            / (2 * eps[i])
            for i in range(6)
        ]
    )
    assert torch.allclose(grad, numeric, rtol=0.03, atol=0.03 * float(numeric.abs().max()))


@pytest.mark.parametrize("method", METHODS)
def test_volume_gradient_is_the_adjoint(method: str) -> None:
    """The DRR is linear in mu, so <grad, mu> equals the loss (the gradient is the exact adjoint)."""
    mu = _blob().requires_grad_(True)
    det = Detector(16, 16, (2.0, 2.0), 400.0)
    pose = view_pose("ap", volume_centre_mm(tuple(mu.shape), AFFINE), 250.0)
    weights = torch.rand(16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    value = (DRRRenderer(mu, AFFINE, method=method).line_integrals(det, pose)[0] * weights).sum()
    value.backward()
    assert float((mu.grad * mu.detach()).sum()) == pytest.approx(float(value), rel=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_labels_project_overlapping_structures_as_path_lengths(method: str) -> None:
    """Two boxes one behind the other on the AP axis: both masks are on at the centre pixel (overlap-aware,
    unlike the first-hit original), with path length = box depth; unrequested labels are ignored."""
    shape = (30, 40, 20)
    labels = torch.zeros(shape, dtype=torch.int64)
    labels[10:20, 5:11, 5:15] = 3  # 6 voxels deep along j (1.2 mm each)
    labels[12:18, 25:35, 8:12] = 7  # 10 voxels deep
    labels[0:3, 0:3, 0:3] = 9
    mu = (labels > 0).double() * 0.02
    renderer = DRRRenderer(mu, AFFINE, labels, label_ids=[7, 3], method=method)
    det = Detector(33, 33, (1.0, 1.0), 600.0)
    centre = (AFFINE @ torch.tensor([14.5, 20.0, 9.5, 1.0], dtype=torch.float64))[:3]
    out = renderer.render(det, view_pose("ap", centre, 400.0))
    assert out.label_path_mm.shape == (1, 2, 33, 33) and out.label_mask.dtype == torch.bool
    path = out.label_path_mm[0, :, 16, 16]
    assert path.tolist() == pytest.approx([10 * 1.2, 6 * 1.2], rel=1e-3)
    assert out.label_mask[0, :, 16, 16].tolist() == [True, True]
    assert not out.label_mask[0, :, 0, 0].any()
    # box 7 (4 slices high in k, 1.5 mm) is smaller than box 3 (10 slices) in the image
    area = out.label_mask[0].sum(dim=(1, 2))
    assert area[0] < area[1]


def test_batch_equals_single_renders_and_beer_lambert() -> None:
    mu = _blob()
    centre = volume_centre_mm(tuple(mu.shape), AFFINE)
    poses = random_poses(3, "ap", centre, 250.0, generator=torch.Generator().manual_seed(4))
    det = Detector(20, 20, (2.0, 2.0), 400.0)
    renderer = DRRRenderer(mu, AFFINE)
    batch = renderer.line_integrals(det, poses)
    for i in range(3):
        assert torch.allclose(batch[i], renderer.line_integrals(det, poses[i])[0])
    assert torch.allclose(beer_lambert(batch, 2.0), 2.0 * torch.exp(-batch))
    shown = display_image(batch)
    assert shown.min() >= 0 and shown.max() <= 1


def test_shear_warp_converges_to_joseph_with_oversampling() -> None:
    """The intermediate image adds one bilinear interpolation; its error falls ~h^2 as the grid refines."""
    mu = _blob(32)
    pose = random_poses(
        1,
        "lateral",
        volume_centre_mm(tuple(mu.shape), AFFINE),
        250.0,
        generator=torch.Generator().manual_seed(9),
    )
    det = Detector(40, 40, (1.5, 1.5), 400.0)
    exact = DRRRenderer(mu, AFFINE, method="joseph").line_integrals(det, pose)
    body = exact > 0.05 * exact.max()
    errors = []
    for oversample in (1.0, 2.0):
        warped = DRRRenderer(
            mu, AFFINE, method="shear-warp", oversample=oversample, warp="bilinear"
        ).line_integrals(det, pose)
        errors.append(float(((warped - exact).abs()[body] / exact[body]).mean()))
    assert errors[1] < errors[0] / 3
    assert errors[1] < 0.006
    # the default bicubic warp stays close to Joseph too (its accuracy against Siddon is tested on chest-ct)
    bicubic = DRRRenderer(mu, AFFINE, method="shear-warp", oversample=2.0).line_integrals(det, pose)
    assert float(((bicubic - exact).abs()[body] / exact[body]).mean()) < 0.012


def test_label_warp_equals_grid_sample() -> None:
    """The per-label windowed warp gives exactly grid_sample's bilinear and nearest values."""
    counts = torch.zeros(5, 40, 30)
    generator = torch.Generator().manual_seed(0)
    counts[0, 3:9, 4:12] = torch.rand(6, 8, generator=generator)
    counts[1, 30:40, 0:5] = 3.0  # touches the image border
    counts[3, 0, 29] = 1.0  # a single corner pixel; channel 2 stays empty
    counts[4] = torch.rand(40, 30, generator=generator)
    theta = torch.tensor([[[0.9, 0.2, 0.05], [-0.1, 1.1, -0.1]]])
    grid = F.affine_grid(theta, (1, 1, 50, 45), align_corners=True)[0]
    linear, nearest = _warp_label_counts(counts, grid)
    expected = F.grid_sample(counts[None], grid[None], align_corners=True)[0]
    expected_nearest = F.grid_sample(counts[None], grid[None], mode="nearest", align_corners=True)[0]
    assert torch.allclose(linear, expected, atol=1e-6)
    assert torch.equal(nearest, expected_nearest)
    assert float(linear[2].abs().max()) == 0.0


def test_bad_input_is_rejected() -> None:
    mu = torch.zeros(8, 8, 8)
    with pytest.raises(MedistillError, match="3D"):
        DRRRenderer(torch.zeros(8, 8), torch.eye(4))
    with pytest.raises(MedistillError, match="label map shape"):
        DRRRenderer(mu, torch.eye(4), torch.zeros(8, 8, 7, dtype=torch.int64))
    with pytest.raises(MedistillError, match="unknown DRR warp 'cubic'"):
        DRRRenderer(mu, torch.eye(4), warp="cubic")
    with pytest.raises(MedistillError, match="inside the volume"):
        DRRRenderer(mu, torch.eye(4)).line_integrals(
            Detector(4, 4, (1.0, 1.0), 10.0), view_pose("ap", torch.tensor([3.5, 3.5, 3.5]), 2.0)
        )


@pytest.mark.parametrize("block", [4, 16, 64])
def test_banded_lerp_matches_plain_interpolation(block: int) -> None:
    """Banded products equal a direct linear interpolation, zero outside, including windows that slide
    back at the end of the rows and blocks wider than the whole input."""
    generator = torch.Generator().manual_seed(3)
    n, n_valid, cols, q = 3, 20, 5, 45
    voxels = torch.rand(n, n_valid, cols, generator=generator, dtype=torch.float64)
    values = F.pad(voxels, (0, 0, 1, 1))  # one zero row on each side, no more
    slope = torch.tensor([0.45, 0.7, 1.0], dtype=torch.float64)[:, None]
    x = -1.5 + slope * torch.arange(q, dtype=torch.float64)  # starts before voxel 0, ends past the last
    got = banded_lerp(values, x, n_valid, block=block)
    padded = F.pad(voxels, (0, 0, 2, 2))  # voxel i at row i + 2; rows beyond are zeros
    i0 = torch.floor(x).clamp(-2, n_valid)
    w = (x - i0).clamp(0, 1)[..., None]
    rows = (i0 + 2).long()
    lo = torch.gather(padded, 1, rows[..., None].expand(-1, -1, cols))
    hi = torch.gather(padded, 1, (rows + 1)[..., None].expand(-1, -1, cols))
    expected = (1 - w) * lo + w * hi
    assert torch.allclose(got, expected, atol=1e-12)
    assert torch.allclose(
        banded_lerp(values, x, n_valid, total=True, block=block), expected.sum(0), atol=1e-12
    )
