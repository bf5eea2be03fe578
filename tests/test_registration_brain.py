"""Skull stripping and GM/WM maps of the brain pair (brain-mr <-> head-mr), and its real-pair entries.

Phantom tests pin the two building blocks (multi-Otsu thresholds, the brain mask's closing and filling);
the real-data tests check the derived maps of both example sets for the properties a reader would look
for: the brain mask sits well inside the head (no scalp, no skull), GM and WM volumes are those of an
adult brain in MNI space, WM is brighter than GM in T1, and the stripped T1 is zero outside the mask.
Real-data tests skip on a developer's machine without the sets and fail under CI
(``example_data.require_example``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from example_data import require_example
from medistill.config import load_config
from medistill.errors import MedistillError
from medistill.io.example_formats import load_head_mr
from medistill.tasks import brain_tissue
from medistill.tasks.brain_tissue import GM, WM, BrainTissue, brain_mask, multi_otsu
from medistill.tasks.registration_real import RealPair, load_pair

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "reg_brain_quick.yaml"


def test_multi_otsu_puts_a_threshold_between_each_pair_of_classes() -> None:
    rng = np.random.default_rng(0)
    # overlapping classes (SD 12): the optimum is unique, near the midpoints 70 and 130
    values = np.concatenate([rng.normal(m, 12.0, n) for m, n in ((40, 3000), (100, 5000), (160, 4000))])
    low, high = multi_otsu(values)
    assert 62 < low < 78 and 122 < high < 138, (low, high)
    with pytest.raises(MedistillError, match="multi_otsu"):
        multi_otsu(np.ones(10))


def test_brain_mask_fills_what_a_ribbon_with_gaps_encloses() -> None:
    """A 'cortex' shell 4 voxels thick (the cortex at 1 mm: 2.5-4) cut by an 'interhemispheric fissure' 2
    voxels wide, with a 'brain stem' opening to the outside: the closing bridges the cut, the fills take
    the inside (WM and ventricles) in though it opens to the outside; nothing beyond the shell."""
    x, y, z = np.mgrid[:48, :48, :48] - 23.5
    r = np.sqrt(x**2 + y**2 + z**2)
    ribbon = (r > 15) & (r < 19)
    ribbon &= np.abs(x) > 1
    ribbon &= ~((np.abs(x) < 3) & (np.abs(y) < 3) & (z < 0))  # an opening at the base (the brain stem)
    assert not ndimage.binary_fill_holes(ribbon)[r < 14].any()  # a 3D fill alone leaks out at the base
    mask = brain_mask(ribbon, (1.0, 1.0, 1.0), closing_mm=3.0)
    assert mask[r < 14].all()
    assert not mask[r > 19.5].any()
    with pytest.raises(MedistillError, match="empty"):
        brain_mask(np.zeros((4, 4, 4), bool), (1.0, 1.0, 1.0))


@pytest.fixture(scope="module")
def head() -> BrainTissue:
    return brain_tissue.head_mr_tissue(require_example("head-mr"))


@pytest.fixture(scope="module")
def brain() -> BrainTissue:
    return brain_tissue.brain_mr_tissue(require_example("brain-mr"))


def _exterior(head_t1: np.ndarray, spacing_mm: float) -> np.ndarray:
    """Air outside the head: dark voxels reachable from the array's border through channels wider than
    6 mm (so the ear canals and sinuses, open to the air through narrow passages, do not count)."""
    dark = head_t1 < 0.1 * np.percentile(head_t1, 99)
    wide = ndimage.distance_transform_edt(dark, sampling=spacing_mm) > 3.0
    lab, _ = ndimage.label(wide)
    faces = [lab[0], lab[-1], lab[:, 0], lab[:, -1], lab[:, :, 0], lab[:, :, -1]]
    border = np.unique(np.concatenate([f.ravel() for f in faces]))
    return ndimage.binary_dilation(np.isin(lab, border[border > 0]), iterations=2)  # back to the surface


def test_head_mr_brain_mask_is_inside_the_skull(head: BrainTissue) -> None:
    """Colin27 with skull and scalp: the stripped brain is > 8 mm (scalp + skull) from the air everywhere
    (measured: 14 mm), and the stripped T1 is the original one inside the mask, 0 outside."""
    t1, _, _ = load_head_mr(require_example("head-mr"))
    offset = np.rint(np.linalg.inv(t1.affine) @ head.t1.affine[:, 3]).astype(int)[:3]
    box = tuple(slice(o, o + n) for o, n in zip(offset, head.mask.shape, strict=True))
    full = np.zeros(t1.shape, bool)
    full[box] = head.mask
    coarse = t1.array[::2, ::2, ::2]  # the distance test on a 2 mm copy: 8x cheaper, same answer at 1 mm
    air = _exterior(coarse, 2.0)
    distance = ndimage.distance_transform_edt(~air, sampling=2.0)
    assert distance[full[::2, ::2, ::2]].min() > 8.0
    np.testing.assert_array_equal(head.t1.array, np.where(head.mask, t1.array[box], 0))
    assert head.thresholds is not None and head.thresholds[0] < head.thresholds[1]


@pytest.mark.parametrize("side", ["head", "brain"])
def test_gm_and_wm_are_those_of_an_adult_brain_in_mni_space(side: str, request) -> None:
    """Both sets are in MNI space, ~1.1x an average adult brain per axis (native: GM 600-800 ml, WM 400-550
    ml). Measured: MNI152 GM 1080 / WM 632 ml (probability maps), Colin27 842 / 713 ml (multi-Otsu)."""
    tissue: BrainTissue = request.getfixturevalue(side)
    ml = tissue.volumes_ml()
    assert 700 < ml["GM"] < 1200 and 550 < ml["WM"] < 850, ml
    assert 1500 < ml["brain"] < 2100 and ml["GM"] + ml["WM"] < ml["brain"], ml
    t1, lab = tissue.t1.array, tissue.labels.array
    assert t1[lab == WM].mean() > 1.15 * t1[lab == GM].mean()  # T1: WM brighter than GM
    assert not lab[~tissue.mask].any() and not t1[~tissue.mask].any()  # stripped: nothing outside


def test_real_pair_config_accepts_the_brain_examples(
    head: BrainTissue, brain: BrainTissue, monkeypatch
) -> None:
    cfg = load_config(CONFIG)
    pairs = cfg.eval.real_pairs
    assert [(p.moving.example, p.fixed.example) for p in pairs] == [
        ("head-mr", "brain-mr"),
        ("brain-mr", "head-mr"),
    ]
    assert cfg.data.example == "brain-mr"
    with pytest.raises(ValueError, match="example"):
        RealPair(fixed={"example": "brain-ct"}, moving={"example": "head-mr"})
    # both sides score GM and WM of the stripped T1, scaled as MR even in a CT run (default "ct")
    monkeypatch.setattr(brain_tissue, "load_brain_tissue", {"head-mr": head, "brain-mr": brain}.get)
    fixed, fixed_lab, moving, moving_lab, names = load_pair(
        pairs[0], "eval.real_pairs.0", "ct", (-1000.0, 600.0)
    )
    assert names == ["GM", "WM"]
    assert np.array_equal(np.unique(fixed_lab.array), [0, 1, 2])
    assert np.array_equal(np.unique(moving_lab.array), [0, 1, 2])
    for img in (fixed, moving):
        assert img.array.max() == 1.0 and np.percentile(img.array[img.array > 0], 50) > 0.3
