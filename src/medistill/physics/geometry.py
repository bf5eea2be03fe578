"""Cone-beam X-ray geometry: a flat detector, a pose, and the 3x4 projection matrix that joins them.

Why one pinhole model: every camera here is ``P = K [R | t]`` (Hartley & Zisserman), so a DRR, its
label masks and any point a user marks in the CT agree by construction, and the geometry can be written
to ``geometry.json`` as plain numbers that any other tool can reuse.

Conventions (stated once, used everywhere in :mod:`medistill.physics`):

* World: RAS millimetres, exactly the space of the volume's affine (voxel index ``(i, j, k)`` -> mm).
* Camera frame: origin at the X-ray source, ``z`` along the principal ray (source -> detector),
  ``x`` along detector columns, ``y`` along detector rows. A pose is ``x_cam = R x_world + t`` with
  ``R`` a proper rotation; the source sits at ``-R^T t`` in world mm.
* Detector pixels: pixel ``(row, col)`` has its centre at ``(u, v) = (col, row)`` (0-based, centres on
  integers); ``P @ [x, y, z, 1]`` is proportional to ``[u, v, 1]``. The principal point defaults to the
  detector centre ``((W-1)/2, (H-1)/2)``. ``mirror=True`` flips the column axis (negative focal length in
  ``x``), which turns a view seen from the source into the view seen from behind the detector.
* Display: presets put the patient's head at the top; ``ap`` and ``pa`` put the patient's right on the
  image's left (the radiology convention for frontal films); ``lateral`` is a left-lateral view (source on
  the patient's right) seen from the source, anterior on the image's right.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from medistill.errors import MedistillError

# Camera-to-world rotations (columns: camera x, y, z in RAS) of the named views, before any extra rotation.
_VIEW_AXES: dict[str, tuple[tuple[float, float, float], ...]] = {
    # columns -> patient's left (-x), rows -> inferior (-z), beam anterior -> posterior (-y)
    "ap": ((-1.0, 0.0, 0.0), (0.0, 0.0, -1.0), (0.0, -1.0, 0.0)),
    # beam posterior -> anterior (+y); camera x -> patient's right, mirrored on display (see PRESET_MIRROR)
    "pa": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0), (0.0, 1.0, 0.0)),
    # beam right -> left (-x); columns -> anterior (+y)
    "lateral": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0), (-1.0, 0.0, 0.0)),
}
PRESET_MIRROR: dict[str, bool] = {"ap": False, "pa": True, "lateral": False}
VIEWS = tuple(_VIEW_AXES)


@dataclass(frozen=True)
class Detector:
    """A flat-panel detector at ``sdd_mm`` from the source.

    Args:
        height: rows ``H``.
        width: columns ``W``.
        spacing_mm: pixel pitch ``(row, col)`` in mm.
        sdd_mm: source-to-detector distance (mm), along the principal ray.
        principal_point_px: ``(row, col)`` where the principal ray meets the detector; default centre.
        mirror: flip the column axis (see module docstring).
    """

    height: int
    width: int
    spacing_mm: tuple[float, float]
    sdd_mm: float
    principal_point_px: tuple[float, float] | None = None
    mirror: bool = False

    def __post_init__(self) -> None:
        if self.height <= 0 or self.width <= 0:
            raise MedistillError(f"detector size must be positive, got {self.height}x{self.width}")
        if min(self.spacing_mm) <= 0:
            raise MedistillError(f"detector spacing must be positive, got {self.spacing_mm} mm")
        if self.sdd_mm <= 0:
            raise MedistillError(f"source-to-detector distance must be positive, got {self.sdd_mm} mm")

    @property
    def principal_point(self) -> tuple[float, float]:
        """``(row, col)`` of the principal point in pixels."""
        if self.principal_point_px is not None:
            return self.principal_point_px
        return ((self.height - 1) / 2.0, (self.width - 1) / 2.0)

    def intrinsics(self, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> Tensor:
        """``K`` (3 3): camera frame (mm) -> homogeneous pixel ``(u, v, 1)``."""
        row0, col0 = self.principal_point
        fx = self.sdd_mm / self.spacing_mm[1] * (-1.0 if self.mirror else 1.0)
        fy = self.sdd_mm / self.spacing_mm[0]
        return torch.tensor([[fx, 0.0, col0], [0.0, fy, row0], [0.0, 0.0, 1.0]], dtype=dtype, device=device)

    def to_dict(self) -> dict[str, object]:
        return {
            "height": self.height,
            "width": self.width,
            "spacing_mm": list(self.spacing_mm),
            "sdd_mm": self.sdd_mm,
            "principal_point_px": list(self.principal_point),
            "mirror": self.mirror,
        }


@dataclass
class Pose:
    """A batch of rigid poses, world -> camera: ``x_cam = rotation @ x_world + translation_mm``.

    ``rotation`` is (B 3 3), ``translation_mm`` is (B 3); both may require grad.
    """

    rotation: Tensor
    translation_mm: Tensor

    def __post_init__(self) -> None:
        if self.rotation.ndim == 2:
            self.rotation = self.rotation[None]
        if self.translation_mm.ndim == 1:
            self.translation_mm = self.translation_mm[None]

    def __len__(self) -> int:
        return self.rotation.shape[0]

    def __getitem__(self, index: int | slice) -> Pose:
        if isinstance(index, int):
            index = slice(index, index + 1)
        return Pose(self.rotation[index], self.translation_mm[index])

    @property
    def source_mm(self) -> Tensor:
        """(B 3) source positions in world mm."""
        return -(self.rotation.transpose(1, 2) @ self.translation_mm[..., None])[..., 0]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Pose:
        return Pose(self.rotation.to(device=device, dtype=dtype), self.translation_mm.to(device, dtype))


def projection_matrix(detector: Detector, pose: Pose) -> Tensor:
    """(B 3 4) matrices ``P = K [R | t]`` mapping homogeneous world mm to homogeneous pixels ``(u, v, 1)``."""
    k = detector.intrinsics(pose.rotation.dtype, pose.rotation.device)
    rt = torch.cat([pose.rotation, pose.translation_mm[..., None]], dim=-1)
    return k @ rt


def project_points(detector: Detector, pose: Pose, points_mm: Tensor) -> Tensor:
    """Pixel coordinates ``(u, v) = (col, row)`` (B N 2) of world points (B N 3) or (N 3)."""
    p = projection_matrix(detector, pose)
    if points_mm.ndim == 2:
        points_mm = points_mm.expand(len(pose), -1, -1)
    homog = torch.cat([points_mm, torch.ones_like(points_mm[..., :1])], dim=-1)
    uvw = homog @ p.transpose(1, 2)
    return uvw[..., :2] / uvw[..., 2:]


def pixel_directions(detector: Detector, pose: Pose) -> Tensor:
    """(B H W 3) world-space vectors from the source to each pixel centre (length = distance in mm)."""
    dtype, device = pose.rotation.dtype, pose.rotation.device
    rows = torch.arange(detector.height, dtype=dtype, device=device)
    cols = torch.arange(detector.width, dtype=dtype, device=device)
    v, u = torch.meshgrid(rows, cols, indexing="ij")
    uv1 = torch.stack([u, v, torch.ones_like(u)], dim=-1)  # H W 3
    cam = uv1 @ torch.linalg.inv(detector.intrinsics(dtype, device)).T * detector.sdd_mm
    return torch.einsum("bji,hwj->bhwi", pose.rotation, cam)


def _axis_rotation(axis: int, angle_rad: Tensor) -> Tensor:
    """(B 3 3) right-handed rotations by ``angle_rad`` (B) about world axis ``axis``."""
    c, s = torch.cos(angle_rad), torch.sin(angle_rad)
    one, zero = torch.ones_like(c), torch.zeros_like(c)
    a, b = [(1, 2), (2, 0), (0, 1)][axis]
    m = [[one, zero, zero], [zero, one, zero], [zero, zero, one]]
    m[a][a], m[a][b], m[b][a], m[b][b] = c, -s, s, c
    return torch.stack([torch.stack(row, dim=-1) for row in m], dim=-2)


def view_pose(
    view: str,
    isocentre_mm: Tensor,
    sid_mm: float | Tensor,
    angles_rad: Tensor | None = None,
    shift_mm: Tensor | None = None,
) -> Pose:
    """Poses of a C-arm looking at ``isocentre_mm`` from ``sid_mm`` away, around a named view.

    Args:
        view: ``"ap"``, ``"pa"`` or ``"lateral"``.
        isocentre_mm: (3) or (B 3) world point on the principal ray (e.g. the volume centre).
        sid_mm: source-to-isocentre distance.
        angles_rad: (B 3) extra rotations of the whole C-arm about the isocentre: about the patient's
            superior axis (LAO/RAO-like), about the right-left axis (cranial/caudal tilt), and an in-plane
            roll about the beam. Zero gives the preset.
        shift_mm: (B 3) world translation of the isocentre (table shift).
    """
    if view not in _VIEW_AXES:
        raise MedistillError(f"unknown view {view!r}; choose one of {', '.join(VIEWS)}")
    iso = torch.as_tensor(isocentre_mm, dtype=torch.float64)
    batch = max(
        [iso.shape[0] if iso.ndim == 2 else 1] + [x.shape[0] for x in (angles_rad, shift_mm) if x is not None]
    )
    dtype = angles_rad.dtype if angles_rad is not None else iso.dtype
    device = angles_rad.device if angles_rad is not None else iso.device
    iso = iso.to(dtype=dtype, device=device).expand(batch, 3)
    if shift_mm is not None:
        iso = iso + shift_mm
    if angles_rad is None:
        angles_rad = torch.zeros(batch, 3, dtype=dtype, device=device)
    base = torch.tensor(_VIEW_AXES[view], dtype=dtype, device=device).T  # columns are camera axes
    world_turn = _axis_rotation(2, angles_rad[:, 0]) @ _axis_rotation(0, angles_rad[:, 1])
    cam_to_world = world_turn @ base @ _axis_rotation(2, angles_rad[:, 2])
    source = iso - torch.as_tensor(sid_mm, dtype=dtype, device=device).reshape(-1, 1) * cam_to_world[:, :, 2]
    rotation = cam_to_world.transpose(1, 2)
    return Pose(rotation, -(rotation @ source[..., None])[..., 0])


def random_poses(
    n: int,
    view: str,
    isocentre_mm: Tensor,
    sid_mm: float,
    *,
    angle_range_deg: tuple[float, float, float] = (15.0, 10.0, 5.0),
    shift_range_mm: tuple[float, float, float] = (10.0, 10.0, 10.0),
    generator: torch.Generator | None = None,
) -> Pose:
    """``n`` poses around ``view`` with angles uniform in ``+-angle_range_deg`` and isocentre shifts uniform
    in ``+-shift_range_mm`` (world axes). Deterministic for a seeded ``generator``."""
    u = torch.rand(n, 6, generator=generator, dtype=torch.float64) * 2.0 - 1.0
    angles = u[:, :3] * torch.tensor(angle_range_deg, dtype=torch.float64) * (math.pi / 180.0)
    shifts = u[:, 3:] * torch.tensor(shift_range_mm, dtype=torch.float64)
    return view_pose(view, isocentre_mm, sid_mm, angles, shifts)


def volume_centre_mm(shape: tuple[int, int, int], affine: Tensor) -> Tensor:
    """(3) world position of the centre of a volume's voxel grid."""
    centre = torch.tensor([(s - 1) / 2.0 for s in shape] + [1.0], dtype=torch.float64)
    return (torch.as_tensor(affine, dtype=torch.float64) @ centre)[:3]
