"""The first task end to end on real data: 2D lung segmentation on chest-ct slices via the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medistill.cli import main
from medistill.io.axial import axial_axis
from medistill.tasks.lung2d import air_in_body_baseline, slab_split


def test_slab_split_is_disjoint_with_gaps() -> None:
    split = slab_split(40, 8)
    all_idx = np.concatenate(list(split.values()))
    assert len(all_idx) == len(set(all_idx.tolist()))
    assert set(all_idx.tolist()).isdisjoint({8, 16, 24, 32})  # first slice of each later slab is a gap
    assert len(split["train"]) > len(split["val"]) > 0 and len(split["test"]) > 0


def test_axial_axis_follows_the_affine() -> None:
    assert axial_axis(np.diag([-0.7, 0.7, 2.5, 1.0])) == 2
    perm = np.zeros((4, 4))
    perm[0, 2], perm[1, 0], perm[2, 1], perm[3, 3] = 1.0, 1.0, 3.0, 1.0
    assert axial_axis(perm) == 1


def test_air_baseline_finds_air_inside_body_only() -> None:
    hu = np.full((64, 64), -1000.0)  # outside air
    hu[8:56, 8:56] = 40.0  # body
    hu[20:40, 14:30] = -850.0  # a lung
    base = air_in_body_baseline(hu)
    assert base[25, 20] and not base[2, 2] and base.sum() == 20 * 16


@pytest.mark.slow
def test_lung_task_learns_on_chest_ct(tmp_path: Path) -> None:
    run = tmp_path / "run"
    sets = [
        "data.size=64",
        "stages.model.models.net.args.features=[8,16,32]",
        "train.steps=60",
        "train.batch_size=8",
        "train.val_every=30",
        "train.log_every=10",
        "train.lr=0.005",
        "train.progress=false",
    ]
    args = [x for s in sets for x in ("--set", s)]
    main(["run", "configs/lung2d.yaml", "--out", str(run), *args])
    result = json.loads((run / "eval" / "metrics.json").read_text())
    case = result["cases"]["chest-ct"]
    print(f"lung Dice {case['dice']:.4f} vs air-threshold baseline {case['dice_baseline_air_threshold']:.4f}")
    assert case["dice"] > 0.90  # the stated bound after 60 steps at 64x64
    assert (run / "report.html").stat().st_size > 10_000 and (run / "eval" / "overlay.png").exists()
    losses = [
        json.loads(ln)["loss"]
        for ln in (run / "model" / "metrics.jsonl").read_text().splitlines()
        if '"train"' in ln
    ]
    assert losses[-1] < losses[0]

    from medistill.io.examples import example_file

    ct = example_file("chest-ct", "cxr.nii.gz")
    pred = tmp_path / "pred.nii.gz"
    main(["predict", str(run), str(ct), "--out", str(pred)])
    p, c = nib.load(pred), nib.load(ct)
    assert p.shape == c.shape and np.allclose(p.affine, c.affine)
    mask = np.asarray(p.dataobj)
    lung = np.isin(
        np.asarray(nib.load(example_file("chest-ct", "mask.nii.gz")).dataobj), [10, 11, 12, 13, 14]
    )
    assert 2 * (mask.astype(bool) & lung).sum() / (mask.astype(bool).sum() + lung.sum()) > 0.85

    main(["export", str(run)])
    parity = json.loads((run / "export" / "parity.json").read_text())
    assert parity["model.net"]["max_abs_diff"] < 1e-3
    assert parity["model.net"]["inputs"] == {"image": [1, 1, 64, 64]}  # a real validation slice

    main(["bench", str(run), "--repeats", "5"])
    profile = json.loads((run / "bench" / "profile.json").read_text())
    row = profile["rows"][0]
    assert row["repeats"] == 5 and 0 < row["min_s_torch"] <= row["median_s_torch"]
    assert row["whole_inputs"]["image"][2:] == [64, 64] and row["whole_inputs"]["image"][0] > 10
    assert profile["machine"]["cpu"] and profile["machine"]["load_avg_1min"] is not None
