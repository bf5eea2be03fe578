"""Segmentation metrics: statuses, penalties, exclusions and summaries by hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medistill.errors import MedistillError
from medistill.metrics.segmentation import (
    dice,
    image_diagonal_mm,
    rows_markdown,
    score_structures,
    summarise,
    summarise_batch,
    summary_markdown,
    summary_row,
)


def cube(shape: tuple[int, ...], lo: int, hi: int) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[tuple(slice(lo, hi) for _ in shape)] = True
    return m


def test_dice_of_a_mask_with_itself_is_one_and_empty_vs_empty_is_nan() -> None:
    m = cube((8, 8, 8), 2, 5)
    assert dice(m, m) == 1.0
    assert dice(torch.from_numpy(m), torch.from_numpy(m)) == 1.0
    assert math.isnan(dice(np.zeros((4, 4)), np.zeros((4, 4))))
    assert dice(np.zeros((4, 4)), m[2, :4, :4]) == 0.0  # a miss is 0, not excluded
    half = m.copy()
    half[2] = False  # 18 of 27 voxels: Dice = 2*18 / (18 + 27) = 0.8
    assert dice(half, m) == pytest.approx(0.8)
    with pytest.raises(MedistillError, match="shape"):
        dice(m, m[0])


def test_each_structure_gets_its_status_and_stated_penalty() -> None:
    shape, spacing = (10, 12, 6), (1.0, 2.0, 3.0)
    diag = math.sqrt(10**2 + 24**2 + 18**2)  # 31.62 mm
    assert image_diagonal_mm(shape, spacing) == pytest.approx(diag)
    t = cube(shape, 1, 5)
    empty = np.zeros(shape, bool)
    shifted = np.roll(t, 1, axis=1)  # 1 voxel = 2 mm along y
    pred = {"hit": shifted, "miss": empty, "fp": t, "none": empty}
    truth = {"hit": t, "miss": t, "fp": empty, "none": empty}
    s = score_structures(pred, truth, spacing)
    assert {k: v["status"] for k, v in s.items()} == {
        "hit": "hit",
        "miss": "miss",
        "fp": "false_positive",
        "none": "empty",
    }
    assert s["hit"]["dice"] == pytest.approx(0.75) and s["hit"]["hd95_mm"] == pytest.approx(2.0)
    for k in ("miss", "fp"):
        assert s[k]["dice"] == 0.0 and s[k]["hd95_mm"] == pytest.approx(diag)
    assert math.isnan(s["none"]["dice"]) and math.isnan(s["none"]["hd95_mm"])


def test_array_input_with_names_and_dice_only_without_spacing() -> None:
    t = np.stack([cube((6, 6), 1, 4), np.zeros((6, 6), bool)])
    s = score_structures(torch.from_numpy(t), t, names=["bone", "metal"])
    assert s["bone"] == {"dice": 1.0, "status": "hit"}  # no spacing: no HD95 key at all
    assert s["metal"]["status"] == "empty" and math.isnan(s["metal"]["dice"]) and "hd95_mm" not in s["metal"]
    with pytest.raises(MedistillError, match="spacing_mm"):
        score_structures(t, t, spacing_mm=(1.0, 1.0, 1.0))
    with pytest.raises(MedistillError, match="C = 3"):
        score_structures(t, t, names=["a", "b", "c"])


def _case(status: str, d: float, h: float) -> dict[str, object]:
    return {"dice": d, "hd95_mm": h, "status": status}


def test_summary_penalises_misses_excludes_and_counts_empty_and_states_sd_over_cases() -> None:
    nan = float("nan")
    cases = {
        "c1": {"liver": _case("hit", 0.9, 2.0), "kidney": _case("hit", 0.8, 4.0)},
        "c2": {"liver": _case("hit", 0.7, 6.0), "kidney": _case("miss", 0.0, 100.0)},
        "c3": {"liver": _case("hit", 0.8, 4.0), "kidney": _case("empty", nan, nan)},
    }
    s = summarise(cases)
    liver, kidney, overall = s["structures"]["liver"], s["structures"]["kidney"], s["overall"]
    assert liver["dice"] == pytest.approx(0.8) and liver["dice_sd"] == pytest.approx(0.1)  # sample SD
    assert liver["hd95_mm"] == pytest.approx(4.0) and liver["hd95_sd_mm"] == pytest.approx(2.0)
    assert kidney["n"] == 2 and kidney["misses"] == 1 and kidney["empty_excluded"] == 1
    assert kidney["dice"] == pytest.approx(0.4) and kidney["hd95_mm"] == pytest.approx(52.0)
    # per case: c1 0.85, c2 0.35, c3 0.8 (kidney excluded) -> mean 2/3, SD over the 3 cases
    assert overall["dice"] == pytest.approx(2.0 / 3.0)
    assert overall["dice_sd"] == pytest.approx(float(np.std([0.85, 0.35, 0.8], ddof=1)))
    assert overall["n"] == 3 and overall["misses"] == 1 and overall["empty_excluded"] == 1
    assert s["sd_over"] == liver["sd_over"] == overall["sd_over"] == "cases"
    assert all(math.isfinite(v) for st in (liver, kidney, overall) for v in (st["dice"], st["hd95_mm"]))


def test_markdown_caption_states_n_sd_and_misses_per_model() -> None:
    t = cube((8, 8), 2, 6)
    good = summarise_batch(np.stack([t[None], t[None]]), np.stack([t[None], t[None]]), ["ring"], (1.0, 1.0))
    bad = summarise_batch(np.zeros((2, 1, 8, 8), bool), np.stack([t[None], t[None]]), ["ring"], (1.0, 1.0))
    assert bad["overall"]["misses"] == 2 and bad["structures"]["ring"]["dice"] == 0.0
    md = summary_markdown({"teacher": good, "student": bad})
    assert "n = 2 cases per model" in md and "± is the sample SD over cases" in md
    assert "teacher: 0 missed" in md and "student: 2 missed" in md
    assert "| ring (n = 2/2) | 100.0 ± 0.0 | 0.0 ± 0.0 | 0.0 ± 0.0 | 11.3 ± 0.0 |" in md  # 8 sqrt 2 mm
    rows = {"teacher": summary_row(good), "student": summary_row(bad)}
    assert rows["student"]["misses"] == 2 and rows["teacher"]["mean"] == 1.0
    table = rows_markdown(rows, ["ring"], unit="images")
    assert "n = 2 images per model" in table and "| student | 0.000 | 0.000 ± 0.000 |" in table
    assert "HD95" in md and "HD95" not in table  # a Dice-only table states a Dice-only penalty
