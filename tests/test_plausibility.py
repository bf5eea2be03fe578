"""Chest plausibility on hand-drawn frontal masks (patient's right on the image's left): a normal chest
passes every check, and each kind of anatomical nonsense fails the check named for it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medistill.errors import MedistillError
from medistill.metrics.plausibility import chest_plausibility

H, W = 200, 240
ROWS, COLS = np.mgrid[0:H, 0:W]


def ellipse(row: float, col: float, a_rows: float, b_cols: float) -> np.ndarray:
    return ((ROWS - row) / a_rows) ** 2 + ((COLS - col) / b_cols) ** 2 <= 1


def disc(row: float, col: float, radius: float) -> np.ndarray:
    return (ROWS - row) ** 2 + (COLS - col) ** 2 <= radius**2


# two lung fields of pi * 65 * 38 px = 16.2 % of the image each; a heart disc (5.9 %) low in the chest and
# right of the midline between the lungs (the patient's left), overlapping both lungs as in projection
LUNG_R, LUNG_L = ellipse(100, 65, 65, 38), ellipse(100, 175, 65, 38)  # patient's right, patient's left
HEART = disc(125, 132, 30)


def chest(lungs: np.ndarray, heart: np.ndarray = HEART) -> dict[str, np.ndarray]:
    return {"lungs": lungs, "heart": heart}


def centroid_col(mask: np.ndarray) -> float:
    return float(np.nonzero(mask)[1].mean())


def test_a_normal_chest_is_plausible_with_the_measured_numbers() -> None:
    r = chest_plausibility(chest(LUNG_R | LUNG_L))
    assert r["plausible"] and r["failed"] == [], r["failed"]
    c = r["checks"]
    assert c["two_lung_fields"]["n_fields"] == 2 and min(c["two_lung_fields"]["fraction_in_own_half"]) == 1.0
    # each field is its ellipse minus the heart (the opening only nibbles a few boundary pixels)
    expect = [float((lung & ~HEART).mean()) for lung in (LUNG_R, LUNG_L)]
    assert np.allclose(c["lung_field_sizes"]["fraction_of_image"], expect, rtol=0.02)
    assert abs(c["heart_found"]["fraction_of_image"] - np.pi * 30**2 / (H * W)) < 0.002
    # the heart's centroid across, between the two field centroids (0 = image-left, 1 = image-right)
    x0, x1 = (centroid_col(lung & ~HEART) for lung in (LUNG_R, LUNG_L))
    assert abs(c["heart_between_lungs"]["relative_x"] - (132 - x0) / (x1 - x0)) < 0.01
    assert c["heart_towards_patient_left"]["relative_x"] > 0.5
    # down the lung span (rows 35..165): (125 - 35) / 130
    assert abs(c["heart_low_in_lung_span"]["relative_y"] - 90 / 130) < 0.02
    json.dumps(r)  # JSON-ready: goes into summary files as it is


def test_the_verdict_does_not_depend_on_the_image_size() -> None:
    """A 6x larger film (1200 x 1440 px) is judged on a strided copy: same verdict and fractions."""
    small = chest_plausibility(chest(LUNG_R | LUNG_L))
    big = chest_plausibility(
        {k: np.kron(v, np.ones((6, 6), bool)) for k, v in chest(LUNG_R | LUNG_L).items()}
    )
    assert big["plausible"]
    for name in ("lung_field_sizes", "heart_found"):
        assert np.allclose(
            big["checks"][name]["fraction_of_image"], small["checks"][name]["fraction_of_image"], atol=0.005
        )


def test_one_lung_missing_fails_two_lung_fields_only_on_the_lungs() -> None:
    r = chest_plausibility(chest(LUNG_R))
    assert not r["plausible"]
    assert not r["checks"]["two_lung_fields"]["ok"] and r["checks"]["two_lung_fields"]["n_fields"] == 1
    assert r["checks"]["lung_field_sizes"]["ok"]  # the lung that is there has a normal size (16 %)
    assert r["checks"]["heart_found"]["ok"]


def test_both_lungs_in_one_half_fail_two_lung_fields() -> None:
    lungs = ellipse(100, 30, 65, 22) | ellipse(100, 85, 65, 22)  # two fields, both left of column 120
    r = chest_plausibility(chest(lungs))
    check = r["checks"]["two_lung_fields"]
    assert not r["plausible"] and not check["ok"]
    assert check["n_fields"] == 2 and check["fraction_in_own_half"][1] == 0.0
    assert r["checks"]["lung_field_sizes"]["ok"]  # 9.4 % each: the sizes alone are fine


def test_a_heart_on_the_patients_right_fails_the_side_check() -> None:
    r = chest_plausibility(chest(LUNG_R | LUNG_L, disc(125, 108, 30)))  # left of the lungs' midline
    assert r["failed"] == ["heart_towards_patient_left"]
    assert 0 < r["checks"]["heart_between_lungs"]["relative_x"] < 0.5


def test_a_heart_high_in_the_chest_fails_the_row_check() -> None:
    r = chest_plausibility(chest(LUNG_R | LUNG_L, disc(60, 132, 30)))  # (60 - 35) / 130 = 0.19 of the span
    assert r["failed"] == ["heart_low_in_lung_span"]


def test_lungs_over_90_percent_of_the_image_fail_the_size_check() -> None:
    lungs = np.zeros((H, W), bool)
    lungs[5:195, 6:234] = True
    r = chest_plausibility(chest(lungs))
    sizes = r["checks"]["lung_field_sizes"]
    assert not r["plausible"] and not sizes["ok"]
    assert abs(sizes["lungs_mask_fraction"] - 190 * 228 / (H * W)) < 1e-9 and sizes["total_fraction"] > 0.55
    assert not r["checks"]["two_lung_fields"]["ok"]  # one blob


def test_no_heart_fails_heart_found_and_the_position_checks() -> None:
    r = chest_plausibility(chest(LUNG_R | LUNG_L, np.zeros((H, W), bool)))
    assert r["failed"] == [
        "heart_found",
        "heart_between_lungs",
        "heart_towards_patient_left",
        "heart_low_in_lung_span",
    ]
    assert r["checks"]["heart_between_lungs"]["relative_x"] is None


def test_a_projected_lung_silhouette_is_split_by_the_spine_and_heart() -> None:
    """A DRR-style lung mask marks lung seen through the mediastinum: one blob, until the heart and the
    vertebrae (which overlap it in projection) are taken out."""
    spine = (COLS >= 110) & (COLS < 130)
    silhouette = LUNG_R | LUNG_L | ((ROWS > 40) & (ROWS < 150) & (COLS > 95) & (COLS < 145))
    alone = chest_plausibility(chest(silhouette))
    assert (
        not alone["checks"]["two_lung_fields"]["ok"] and alone["checks"]["two_lung_fields"]["n_fields"] == 1
    )
    with_spine = chest_plausibility(chest(silhouette) | {"vertebrae": spine})
    assert with_spine["plausible"], with_spine["failed"]
    assert with_spine["subtracted_from_lungs"] == ["heart", "vertebrae"]


def test_bad_masks_are_refused_in_one_line() -> None:
    with pytest.raises(MedistillError, match=r"needs masks 'heart'"):
        chest_plausibility({"lungs": LUNG_R})
    with pytest.raises(MedistillError, match=r"needs masks 'lungs' and 'heart' \(got ribs\)"):
        chest_plausibility({"ribs": LUNG_R})
    with pytest.raises(
        MedistillError, match=r"of one shape \(H W\), got lungs \(200, 240\), heart \(100, 240\)"
    ):
        chest_plausibility({"lungs": LUNG_R, "heart": HEART[:100]})
    with pytest.raises(MedistillError, match="one shape"):
        chest_plausibility({"lungs": np.zeros((2, H, W), bool), "heart": np.zeros((2, H, W), bool)})
    with pytest.raises(MedistillError, match="view 'lateral'"):
        chest_plausibility(chest(LUNG_R | LUNG_L), view="lateral")
