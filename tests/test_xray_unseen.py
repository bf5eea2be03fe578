"""The unseen patient of the X-ray task: chest-ct-2 labels grouped by name into the model's classes, DRRs
upright with the patient's right on the image's left (AP and PA), cached renders."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from example_data import require_example
from medistill.errors import MedistillError
from medistill.io.example_formats import load_chest_ct_2
from medistill.physics.attenuation import hu_to_mu
from medistill.tasks import xray_data
from medistill.tasks.xray_data import CLASS_GROUPS, XrayData, render
from medistill.tasks.xray_unseen import (
    SEGMENTATION_FILE,
    UNSEEN_CLASSES,
    load_unseen_volume,
    segment_volume,
    unseen_renders,
)

ALL = list(CLASS_GROUPS)  # the flagship's 8 classes, in its order


@pytest.fixture(scope="module")
def folder() -> Path:
    return require_example("chest-ct-2")


def frontal(view: str) -> dict:
    """A straight AP or PA pose (no obliquity, no shifts)."""
    return {
        "view": view, "angles_deg": [0.0, 0.0, 0.0], "sdd_mm": 1150.0, "sid_mm": 925.0,
        "shift_mm": [0.0, 0.0, 0.0], "detector_shift_px": [0.0, 0.0],
    }  # fmt: skip


def test_segments_land_in_the_model_classes_by_name(folder: Path) -> None:
    ct, lab, names = load_chest_ct_2(folder)
    raw = lab.array.astype(np.int64)
    for classes in (ALL, ["lungs", "heart", "ribs"]):
        vol, known = load_unseen_volume(folder, classes)
        labels = vol.labels.numpy()
        assert known == [c for c in classes if c in ("ribs", "vertebrae", "lungs")]
        for segment, target in UNSEEN_CLASSES.items():
            inside = labels[raw == names[segment]]
            expect = classes.index(target) + 1 if target in classes else 0
            assert inside.size > 0 and np.all(inside == expect), segment
        assert np.all(labels[raw == names["tissue"]] == 0) and np.all(labels[raw == 0] == 0)  # body dropped
        present = set(np.unique(labels).tolist())
        assert present == {0} | {classes.index(c) + 1 for c in known}  # heart, clavicles, ...: empty
    # -3024 HU (outside the scan field) is air; inside, mu is the usual HU -> mu conversion
    hu = ct.array
    mu = vol.mu_per_mm.numpy()
    assert np.all(mu[hu == -3024] == 0.0)
    body = raw == names["tissue"]
    assert np.allclose(mu[body], hu_to_mu(torch.from_numpy(hu[body])).numpy())
    # the LPS file reads as RAS: right lung at +x, spine posterior to the lungs, cervical above lumbar
    world = lambda v: (np.argwhere(raw == names[v]) @ vol.affine[:3, :3].numpy().T).mean(0)  # noqa: E731
    assert world("right lung")[0] > world("left lung")[0]
    assert world("thoracic vertebral column")[1] < world("right lung")[1]
    assert world("cervical vertebral column")[2] > world("lumbar vertebral column")[2]


def test_segment_names_are_matched_case_insensitively_and_missing_ones_named(
    folder: Path, tmp_path: Path
) -> None:
    header_line = b"Segment4_Name:=right lung\n"
    data = (folder / SEGMENTATION_FILE).read_bytes()
    assert data.count(header_line) == 1
    for new, ok in ((b"Segment4_Name:=Right Lung\n", True), (b"Segment4_Name:=lung R\n", False)):
        copy = tmp_path / new.decode().split("=")[1].strip().replace(" ", "_")
        copy.mkdir()
        shutil.copy(folder / "CTChest4.nrrd", copy / "CTChest4.nrrd")
        (copy / SEGMENTATION_FILE).write_bytes(data.replace(header_line, new))
        if ok:
            assert load_unseen_volume(copy, ALL)[1] == ["ribs", "vertebrae", "lungs"]
        else:
            with pytest.raises(
                MedistillError, match=r"Segmentation\.seg\.nrrd: no segment named 'right lung'"
            ):
                load_unseen_volume(copy, ALL)
            assert load_unseen_volume(copy, ["ribs"])[1] == ["ribs"]  # lungs not asked for: not needed


def test_unseen_drrs_are_upright_with_masks_on_the_anatomy(folder: Path, tmp_path: Path) -> None:
    d = XrayData(size=64, n_test=4)
    r = unseen_renders(tmp_path, d, seed=0, folder=folder)
    n = d.n_test
    assert r["line_integral"].shape == (n, 64, 64) and r["masks"].shape == (n, len(ALL), 64, 64)
    assert r["known"] == ["ribs", "vertebrae", "lungs"]
    m = r["masks"]
    ribs, spine, lungs = (ALL.index(c) for c in r["known"])
    for i in range(n):
        for c in (ribs, spine, lungs):
            assert 0.02 < m[i, c].mean() < 0.9  # non-empty, not the whole detector
        assert not m[i, [c for c in range(len(ALL)) if c not in (ribs, spine, lungs)]].any()
        # upright: the lumbar spine reaches rows below the lung bases, the lungs start near the top
        rows_spine, rows_lung = np.nonzero(m[i, spine])[0], np.nonzero(m[i, lungs])[0]
        assert rows_spine.max() > rows_lung.max() + 3 and rows_lung.min() < 64 // 4
        # the image agrees with the masks: rays through the lungs attenuate less than through the spine
        li = r["line_integral"][i]
        assert np.median(li[m[i, lungs] > 0]) < np.median(li[m[i, spine] > 0])


def test_right_lung_is_on_the_image_left_in_ap_and_pa(folder: Path) -> None:
    vol, known = segment_volume(
        folder, {"right lung": "right", "left lung": "left", "thoracic vertebral column": "spine"},
        ["right", "left", "spine"],
    )  # fmt: skip
    assert known == ["right", "left", "spine"]
    d = XrayData(size=64)
    poses = [frontal("ap"), frontal("pa"), *xray_data.sample_poses(4, d.test_poses, np.random.default_rng(0))]
    _, m = render(vol, poses, d.size, d.field_mm)
    for i, p in enumerate(poses):
        col = [np.nonzero(m[i, c])[1].mean() for c in range(3)]
        assert col[0] < col[2] < col[1], (p["view"], col)  # right lung | spine | left lung


def test_unseen_renders_are_cached_and_rerendered_when_the_detector_changes(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real = xray_data.render
    monkeypatch.setattr(xray_data, "render", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    d = XrayData(size=32, n_test=2)
    first = unseen_renders(tmp_path, d, seed=5, folder=folder)
    again = unseen_renders(tmp_path, d, seed=5, folder=folder)
    assert calls == [32] and len(list(tmp_path.glob("unseen-*.npz"))) == 1
    assert np.array_equal(first["line_integral"], again["line_integral"])
    assert np.array_equal(first["masks"], again["masks"]) and again["known"] == first["known"]
    assert str(first["poses"]) == str(again["poses"])
    bigger = unseen_renders(tmp_path, d.model_copy(update={"size": 40}), seed=5, folder=folder)
    assert calls == [32, 40] and bigger["masks"].shape == (2, len(ALL), 40, 40)
    other_seed = unseen_renders(tmp_path, d, seed=6, folder=folder)
    assert calls == [32, 40, 32] and str(other_seed["poses"]) != str(first["poses"])
    assert len(list(tmp_path.glob("unseen-*.npz"))) == 3
