"""Cone-beam geometry: presets show the patient the way radiologists expect, P agrees with the renderer."""

from __future__ import annotations

import math

import pytest
import torch

from medistill.errors import MedistillError
from medistill.physics.drr import DRRRenderer
from medistill.physics.geometry import (
    Detector,
    project_points,
    projection_matrix,
    random_poses,
    view_pose,
    volume_centre_mm,
)

ISO = torch.tensor([10.0, -20.0, 30.0], dtype=torch.float64)
DET = Detector(64, 80, (1.5, 1.25), 1000.0)


@pytest.mark.parametrize("view", ["ap", "pa", "lateral"])
def test_source_distance_and_isocentre_on_principal_point(view: str) -> None:
    pose = view_pose(view, ISO, 700.0)
    assert torch.linalg.norm(pose.source_mm[0] - ISO).item() == pytest.approx(700.0)
    uv = project_points(Detector(64, 80, (1.5, 1.25), 1000.0, mirror=view == "pa"), pose, ISO[None])[0, 0]
    assert uv.tolist() == pytest.approx([(80 - 1) / 2, (64 - 1) / 2])
    assert torch.det(pose.rotation[0]).item() == pytest.approx(1.0)


def test_frontal_views_show_patient_right_on_image_left_and_head_on_top() -> None:
    right, head = ISO + torch.tensor([50.0, 0, 0]), ISO + torch.tensor([0, 0, 50.0])
    for view in ("ap", "pa"):
        det = Detector(64, 80, (1.5, 1.25), 1000.0, mirror=view == "pa")
        u_right, _ = project_points(det, view_pose(view, ISO, 700.0), right[None])[0, 0].tolist()
        _, v_head = project_points(det, view_pose(view, ISO, 700.0), head[None])[0, 0].tolist()
        assert u_right < (80 - 1) / 2, view
        assert v_head < (64 - 1) / 2, view
    anterior = ISO + torch.tensor([0, 50.0, 0])
    u_ant, _ = project_points(DET, view_pose("lateral", ISO, 700.0), anterior[None])[0, 0].tolist()
    assert u_ant > (80 - 1) / 2


def test_magnification_is_sdd_over_source_distance() -> None:
    pose = view_pose("ap", ISO, 600.0)
    offset = torch.tensor([0.0, 0, 30.0])  # 30 mm towards the head, in the isocentre plane
    _, v = project_points(DET, pose, (ISO + offset)[None])[0, 0].tolist()
    assert ((64 - 1) / 2 - v) * 1.5 == pytest.approx(30.0 * 1000.0 / 600.0)


def test_projection_matrix_is_k_times_rt() -> None:
    pose = random_poses(3, "ap", ISO, 800.0, generator=torch.Generator().manual_seed(1))
    p = projection_matrix(DET, pose)
    assert p.shape == (3, 3, 4)
    src = torch.cat([pose.source_mm, torch.ones(3, 1, dtype=torch.float64)], dim=1)
    assert torch.allclose((p @ src[..., None])[..., 0], torch.zeros(3, 3, dtype=torch.float64), atol=1e-8)


def test_random_poses_are_seeded_and_within_range() -> None:
    a = random_poses(
        8, "ap", ISO, 800.0, angle_range_deg=(20, 10, 5), generator=torch.Generator().manual_seed(3)
    )
    b = random_poses(
        8, "ap", ISO, 800.0, angle_range_deg=(20, 10, 5), generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(a.rotation, b.rotation) and torch.equal(a.translation_mm, b.translation_mm)
    beam = a.rotation[:, 2, :]  # camera z in world coordinates
    ap_beam = torch.tensor([0.0, -1.0, 0.0], dtype=torch.float64)
    tilt_deg = torch.rad2deg(torch.acos((beam @ ap_beam).clamp(-1, 1)))
    assert float(tilt_deg.max()) <= math.hypot(20, 10) + 1e-6
    assert float(tilt_deg.max()) > 1.0


def test_detector_rejects_bad_sizes() -> None:
    with pytest.raises(MedistillError, match="size"):
        Detector(0, 10, (1.0, 1.0), 1000.0)
    with pytest.raises(MedistillError, match="spacing"):
        Detector(10, 10, (0.0, 1.0), 1000.0)
    with pytest.raises(MedistillError, match="distance"):
        Detector(10, 10, (1.0, 1.0), -5.0)


@pytest.mark.parametrize("method", ["joseph", "shear-warp"])
@pytest.mark.parametrize("view", ["ap", "lateral"])
def test_renderer_puts_a_bead_where_p_projects_it(method: str, view: str) -> None:
    """A single dense voxel lands on the pixel that the 3x4 matrix P predicts (to a pixel)."""
    mu = torch.zeros(41, 37, 23)
    bead = (27, 12, 15)
    mu[bead] = 1.0
    affine = torch.tensor(
        [[-1.1, 0, 0, 5.0], [0, 0.9, 0, -12.0], [0, 0, 2.0, 40.0], [0, 0, 0, 1]], dtype=torch.float64
    )
    centre = volume_centre_mm(tuple(mu.shape), affine)
    pose = random_poses(
        1, view, centre, 400.0, angle_range_deg=(10, 8, 6), generator=torch.Generator().manual_seed(7)
    )
    det = Detector(96, 96, (1.0, 1.0), 700.0)
    image = DRRRenderer(mu, affine, method=method).line_integrals(det, pose)[0]
    bead_mm = (affine @ torch.tensor([*bead, 1.0], dtype=torch.float64))[:3]
    u, v = project_points(det, pose, bead_mm[None])[0, 0].tolist()
    rows = torch.arange(96, dtype=torch.float64)
    weights = image.double() / image.sum()
    v_centroid = float((weights.sum(1) * rows).sum())
    u_centroid = float((weights.sum(0) * rows).sum())
    assert u_centroid == pytest.approx(u, abs=0.6)
    assert v_centroid == pytest.approx(v, abs=0.6)
