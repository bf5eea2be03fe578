"""Real-pair registration path on a tiny phantom pair: two scans of one object in different fields of view
(grids, spacings, origins) with a known shift between them; the shared pre-alignment must recover it and
the table must score every structure, a missed one as 0."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medistill.errors import MedistillError
from medistill.tasks.registration_real import (
    RealPair,
    evaluate_real_pairs,
    load_pair,
    prealign,
    real_pairs_table,
)

SHIFT_MM = np.array([6.0, -4.0, 5.0])  # the object in the moving scan = the fixed one moved by this


def scan(path: Path, shape: tuple[int, int, int], spacing: tuple[float, ...], origin: tuple[float, ...],
         shift: np.ndarray, drop: int | None = None) -> tuple[Path, Path]:  # fmt: skip
    """The phantom (an ellipsoid body centred at (40, 36, 45) mm with two spheres and a block, labels
    1..3) sampled on a grid, moved by ``shift`` mm; label ``drop`` left out of the label map."""
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")).reshape(3, -1)
    w = affine[:3, :3] @ idx + affine[:3, 3:4] - shift[:, None] - np.array([[40.0], [36.0], [45.0]])
    x, y, z = (c.reshape(shape) for c in w)
    texture = 0.1 * np.sin(x / 5) * np.sin(y / 6) * np.sin(z / 6)
    img = np.where((x / 30) ** 2 + (y / 26) ** 2 + (z / 34) ** 2 < 1, 0.4 + texture, 0.0)
    lab = np.zeros(shape, np.int16)
    for k, (c, r) in enumerate((((-12, 0, 0), 9), ((12, 6, 8), 7)), start=1):
        m = (x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2 < r**2
        img[m], lab[m] = 0.6 + 0.3 * k, k
    block = (abs(x) < 5) & (abs(y + 14) < 5) & (abs(z) < 12)
    img[block], lab[block] = 0.2, 3
    if drop is not None:
        lab[lab == drop] = 0
    nib.save(nib.Nifti1Image(img.astype(np.float32), affine), path.with_suffix(".nii.gz"))
    nib.save(nib.Nifti1Image(lab, affine), path.with_name(path.name + "_labels.nii.gz"))
    return path.with_suffix(".nii.gz"), path.with_name(path.name + "_labels.nii.gz")


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> RealPair:
    tmp = tmp_path_factory.mktemp("real")
    # fixed: 2 x 2 x 3 mm over [0, 78] x [0, 70] x [0, 87] mm; moving: another grid, spacing and origin,
    # its box cut 10 mm short at the top (a different field of view) and without the block's label
    f_img, f_lab = scan(tmp / "fixed", (40, 36, 30), (2.0, 2.0, 3.0), (0.0, 0.0, 0.0), np.zeros(3))
    m_img, m_lab = scan(tmp / "moving", (36, 40, 21), (2.5, 2.0, 4.0), (-5.0, -8.0, -2.0), SHIFT_MM, drop=3)
    labels = {"sphere_a": [1], "sphere_b": [2], "block": [3]}
    side = lambda i, lab: {"image": str(i), "label": str(lab), "labels": labels, "modality": "mr"}  # noqa: E731
    return RealPair(fixed=side(f_img, f_lab), moving=side(m_img, m_lab), name="phantom")


def test_prealignment_recovers_a_known_shift_between_fields_of_view(pair) -> None:
    torch.set_num_threads(1)
    fixed, _, moving, _, _ = load_pair(pair, "pair", "mr", (-1000.0, 600.0))
    for kind in ("rigid", "affine"):
        matrix, seconds = prealign(fixed, moving, kind, threads=1)
        # fixed world x -> moving world x + shift: linear part identity, translation the shift (mm)
        np.testing.assert_allclose(matrix[:3, :3], np.eye(3), atol=0.03)
        assert np.abs(matrix[:3, 3] - SHIFT_MM).max() < 1.0, (kind, matrix[:3, 3])
        assert seconds > 0
    assert np.array_equal(prealign(fixed, moving, "none")[0], np.eye(4))


def test_table_scores_every_structure_and_a_miss_as_zero(pair) -> None:
    torch.set_num_threads(1)
    zero = lambda f, m: torch.zeros(1, 3, *f.shape[2:])  # noqa: E731
    off = lambda f, m: torch.full((1, 3, *f.shape[2:]), 8.0)  # noqa: E731 (8 voxels off: spheres missed)
    results, aligned = evaluate_real_pairs(
        [pair], {"no_registration": zero, "off": off}, 32, "mr", (-1000.0, 600.0), 1
    )
    rows = results["phantom"]
    assert aligned[0]["structures"] == ["sphere_a", "sphere_b", "block"]
    none = rows["no_registration"]
    # after the pre-alignment alone the two spheres overlap well; the block is labelled in the fixed scan
    # only: a miss, Dice 0 and HD95 the grid's diagonal, kept in the mean over structures
    assert none["dice_sphere_a"] > 0.8 and none["dice_sphere_b"] > 0.75
    assert none["dice_block"] == 0.0 and none["misses"] == 1
    diagonal = float(np.linalg.norm(np.array(aligned[0]["spacing"]) * 32))
    assert none["hd95_block_mm"] == pytest.approx(diagonal)
    assert none["dice"] == pytest.approx((none["dice_sphere_a"] + none["dice_sphere_b"]) / 3)
    assert rows["off"]["dice_sphere_a"] < 0.2 and rows["off"]["dice"] < none["dice"]
    assert none["folding_percent"] == 0.0 and none["seconds"] >= 0 and none["prealign_seconds"] > 0
    table = real_pairs_table(results, aligned[0]["structures"])
    assert table["header"][2:5] == ["Dice sphere_a", "Dice sphere_b", "Dice block"]
    assert [r[:2] for r in table["rows"]] == [["no_registration", "phantom"], ["off", "phantom"]]
    assert table["rows"][0][4] == 0.0  # the missed block is a 0 in the table, not a blank


def test_pair_sources_fail_in_one_line(tmp_path) -> None:
    with pytest.raises(ValueError, match="label"):
        RealPair(fixed={"image": str(tmp_path / "a.nii.gz")}, moving={"example": "chest-ct"})
    img, lab = scan(tmp_path / "a", (8, 8, 8), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.zeros(3))
    side = {"image": str(img), "label": str(lab), "labels": {"a": [1]}}
    other = side | {"labels": {"b": [2]}}
    with pytest.raises(MedistillError, match="fixed structures"):
        load_pair(RealPair(fixed=side, moving=other), "eval.real_pairs.0", "mr", (-1000.0, 600.0))
