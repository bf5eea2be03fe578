"""Predictions that do not depend on the field of view (seg3d) or on how the axes are stored (seg3d, lung2d).

* seg3d normalises with statistics fixed from the training subjects (nnU-Net's CT scheme), so a tight
  crop, the same crop padded with air and the whole source volume give the same liver Dice.
* The through-plane axis of the nets follows the working spacing (RAS ``X Y Z`` arrays).
* lung2d cuts slices in one canonical orientation from the affine: the same slice stored in any of the
  8 in-plane orientations gives the same mask.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medistill.config import validate_config
from medistill.io.images import Image, read_image, write_image
from medistill.metrics.segmentation import dice
from medistill.nets.lcovnet import LCOVNet
from medistill.nets.teacher3d import DynUNetTeacher
from medistill.tasks.cohort import WORD_FROM_TOTALSEG, WORD_LABELS, CohortSpec, make_cohort, phantom_abdomen
from medistill.tasks.lung2d import Lung2DTask
from medistill.tasks.segmentation3d import (
    Normalisation,
    Seg3DTask,
    crop_padded,
    fit_ct_normalisation,
    through_plane_axis,
)

LIVER_SRC, LIVER = WORD_FROM_TOTALSEG["liver"][0], WORD_LABELS["liver"]


def shifted(affine: np.ndarray, start: np.ndarray) -> np.ndarray:
    """The affine of a sub-array starting at voxel ``start`` (negative: padding before the array)."""
    out = affine.copy()
    out[:3, 3] = affine[:3, :3] @ np.asarray(start, dtype=float) + affine[:3, 3]
    return out


def fov_variants(ct: Image, lab: Image) -> dict[str, tuple[Image, np.ndarray]]:
    """The source volume whole, tightly cropped to its organs (+ 12 mm), and that crop in 40 mm of air."""
    hu, truth = np.asarray(ct.array), np.rint(lab.array).astype(np.int64)
    organ = truth > 0
    lo = np.array([np.flatnonzero(organ.any(axis=tuple(a for a in range(3) if a != k)))[0] for k in range(3)])
    hi = np.array(
        [np.flatnonzero(organ.any(axis=tuple(a for a in range(3) if a != k)))[-1] + 1 for k in range(3)]
    )
    margin = np.ceil(12.0 / np.asarray(ct.spacing)).astype(int)
    lo, hi = np.maximum(lo - margin, 0), np.minimum(hi + margin, hu.shape)
    pad = np.ceil(40.0 / np.asarray(ct.spacing)).astype(int)
    crop_lo, pad_lo = lo, lo - pad
    size, padded_size = hi - lo, hi - lo + 2 * pad
    return {
        "crop": (
            Image(crop_padded(hu, crop_lo, size, -1000.0), shifted(ct.affine, crop_lo)),
            crop_padded(truth, crop_lo, size, 0),
        ),
        "padded": (
            Image(crop_padded(hu, pad_lo, padded_size, -1000.0), shifted(ct.affine, pad_lo)),
            crop_padded(truth, pad_lo, padded_size, 0),
        ),
        "whole": (ct, truth),
    }


@pytest.mark.slow
def test_liver_dice_does_not_depend_on_the_field_of_view(tmp_path: Path) -> None:
    """A tiny teacher trained on the phantom cohort (tight crops of the phantom) reads the phantom's
    liver alike in a tight crop, in that crop padded with air and in the whole phantom (within 8 Dice
    points; with the volume's own z-score the padded crop lost 30 points in the same setting)."""
    root = tmp_path / "cohort"
    make_cohort(
        root,
        CohortSpec(n_subjects=4, spacing_mm=(3.5,) * 3, min_volume_ml=2.0, split=(0.5, 0.25, 0.25)),
        *phantom_abdomen(),
    )
    raw = {
        "name": "fov",
        "task": "seg3d",
        "data": {
            "dataset": str(root / "dataset.json"),
            "normalisation": "ct_fixed",
            "spacing_mm": [3.5] * 3,
            "patch": [32, 32, 32],
            "fg_fraction": 0.5,
            "rotate_deg": 0,
            "scale": 0,
            "flip_lr": 0,
            "noise": 0,
            "intensity": 0.1,
            "sw_overlap": 0.25,
        },
        "stages": [
            {
                "name": "net",
                "models": {
                    "net": {
                        "name": "dynunet_teacher",
                        "args": {"features": [8, 16, 32, 64, 64], "strides": [1, 2, 2, 2, 2]},
                    }
                },
                "losses": {"seg": {"name": "deep_supervision", "args": {"loss": "dice_ce"}}},
            }
        ],
        "train": {
            "steps": 80,
            "batch_size": 2,
            "lr": 0.01,
            "lr_schedule": "constant",
            "val_every": 1000,
            "log_every": 1000,
            "checkpoint_every": 1000,
            "progress": False,
        },
    }
    task = Seg3DTask(validate_config(raw), tmp_path / "run")
    task.runner.run()
    norm = task.stage_normalisation("net")
    saved = Normalisation.from_dict(
        __import__("json").loads((tmp_path / "run" / "net" / "normalisation.json").read_text()), "saved"
    )
    assert norm == saved and norm.scheme == "ct_fixed" and norm.clip_hu[0] < norm.mean_hu < norm.clip_hu[1]
    net = task.stage_model("net")
    scores = {
        name: dice(task.predict_volume(net, img, norm) == LIVER, truth == LIVER_SRC)
        for name, (img, truth) in fov_variants(*phantom_abdomen()).items()
    }
    print({k: round(v, 3) for k, v in scores.items()})
    assert min(scores.values()) > 0.7, scores  # it learned the liver
    assert max(scores.values()) - min(scores.values()) < 0.08, scores


def test_ct_statistics_come_from_training_foreground_only() -> None:
    """Percentiles, mean and SD of the labelled voxels: background (air, table) cannot move them."""
    rng = np.random.default_rng(0)
    hu = np.full((20, 20, 20), -1000.0)
    lab = np.zeros(hu.shape, np.uint8)
    lab[5:15, 5:15, 5:15] = 1
    hu[lab > 0] = rng.normal(60.0, 20.0, int(lab.sum()))
    norm = fit_ct_normalisation([hu], [lab], ["a"])
    fg = hu[lab > 0]
    assert norm.mean_hu == pytest.approx(fg.mean()) and norm.std_hu == pytest.approx(fg.std())
    assert norm.clip_hu == pytest.approx(tuple(np.percentile(fg, [0.5, 99.5])))
    more_air = np.pad(hu, 10, constant_values=-1000.0)
    image, air = norm.apply(more_air)
    assert np.allclose(image[10:30, 10:30, 10:30], norm.apply(hu)[0]) and air == pytest.approx(image.min())
    zscore = Normalisation("volume_zscore", (-160.0, 240.0))
    assert not np.allclose(zscore.apply(more_air)[0][10:30, 10:30, 10:30], zscore.apply(hu)[0])


def test_through_plane_axis_is_the_coarse_axis() -> None:
    assert through_plane_axis((1.0, 1.0, 3.0)) == 2 and through_plane_axis((0.8, 2.5, 0.8)) == 1
    assert through_plane_axis((3.0, 3.0, 3.0)) == 0  # isotropic: the first axis, the nets' default


def test_lcovnet_line_kernel_runs_along_the_coarse_axis(tmp_path: Path) -> None:
    """On an anisotropic toy grid (2 x 2 x 6 mm) seg3d gives LCOV-Net axis 2: an impulse spreads along
    axis 2 only through the first 1-D conv, and the teacher keeps that axis at full resolution."""
    root = tmp_path / "cohort"
    make_cohort(
        root, CohortSpec(n_subjects=3, spacing_mm=(2.0, 2.0, 6.0), min_volume_ml=2.0), *phantom_abdomen()
    )
    raw = {
        "name": "aniso",
        "task": "seg3d",
        "data": {"dataset": str(root / "dataset.json"), "spacing_mm": [2.0, 2.0, 6.0], "patch": [32, 32, 32]},
        "stages": [
            {
                "name": "s",
                "models": {
                    "net": {"name": "lcovnet", "args": {"features": [4, 8, 8, 8, 8]}},
                    "t": {
                        "name": "dynunet_teacher",
                        "args": {"features": [4, 8, 8, 8, 8], "strides": [1, [1, 2, 2], 2, 2, 2]},
                    },
                },
                "losses": {"seg": {"name": "deep_supervision", "args": {"loss": "dice_ce"}}},
            }
        ],
    }
    task = Seg3DTask(validate_config(raw), tmp_path / "run")
    stage = task.cfg.stages[0]
    net = task.build_model("net", stage.models["net"], probe=True)
    assert isinstance(net, LCOVNet) and net.through_plane_axis == 2
    line = next(m for m in net.encoders[0].pre.modules() if isinstance(m, torch.nn.Conv3d))
    assert tuple(line.weight.shape[2:]) == (1, 1, 3)
    impulse = torch.zeros(1, 1, 9, 9, 9)
    impulse[0, 0, 4, 4, 4] = 1.0
    with torch.no_grad():
        out = (line(impulse) - line(torch.zeros_like(impulse))).abs().sum(1)[0]
    support = np.argwhere(out.numpy() > 1e-7)
    assert {tuple(p[:2]) for p in support} == {(4, 4)} and sorted({p[2] for p in support}) == [3, 4, 5]
    teacher = task.build_model("t", stage.models["t"], probe=True)
    assert isinstance(teacher, DynUNetTeacher) and teacher.divisor == (16, 16, 8)  # z kept at level 2
    with pytest.raises(ValueError, match="through_plane_axis"):
        LCOVNet(3, 1, 2, features=(4, 8, 8, 8, 8), through_plane_axis=3)


# ------------------------------------------------------------------------------------------- lung2d


def in_plane_storages(img: Image) -> dict[str, Image]:
    """The 8 in-plane orientations of an axial volume (swap x/y, flip either): arrays and affines."""
    out = {}
    for swap, fx, fy in itertools.product((False, True), (1, -1), (1, -1)):
        axes = (1, 0) if swap else (0, 1)
        ornt = np.array([[axes[0], fx], [axes[1], fy], [2, 1]], dtype=float)
        array = nib.orientations.apply_orientation(img.array, ornt)
        affine = img.affine @ nib.orientations.inv_ornt_aff(ornt, img.shape)
        out[nib.orientations.aff2axcodes(affine).__str__()] = Image(np.ascontiguousarray(array), affine)
    return out


def test_lung2d_same_mask_in_all_8_in_plane_orientations(tmp_path: Path) -> None:
    """A fixed (untrained, so not flip-symmetric) U-Net through lung2d's predict: every storage gives the
    same mask in world space; fed the stored arrays as they are, the masks differ."""
    rng = np.random.default_rng(0)
    hu = np.full((40, 32, 4), -1000.0, np.float32)  # RAS, 5 x 6 mm in-plane
    g = np.meshgrid(np.linspace(-1, 1, 40), np.linspace(-1, 1, 32), indexing="ij")
    hu[(g[0] / 0.9) ** 2 + (g[1] / 0.7) ** 2 < 1] = 40.0
    hu[((g[0] + 0.4) / 0.3) ** 2 + ((g[1] + 0.1) / 0.45) ** 2 < 1] = -850.0  # right lung, bigger
    hu[((g[0] - 0.45) / 0.2) ** 2 + ((g[1] - 0.2) / 0.3) ** 2 < 1] = -820.0
    hu += rng.normal(0, 20, hu.shape).astype(np.float32)
    ref = Image(hu, np.diag([5.0, 6.0, 8.0, 1.0]))
    raw = {
        "name": "orient",
        "task": "lung2d",
        "data": {"size": 32},
        "stages": [
            {
                "name": "model",
                "models": {"net": {"name": "unet", "args": {"features": [4, 8]}}},
                "losses": {"seg": {"name": "dice_ce"}},
            }
        ],
    }
    task = Lung2DTask(validate_config(raw), tmp_path / "run")
    torch.manual_seed(0)
    net = task.build_model("net", task.cfg.stages[0].models["net"]).eval()
    task.predict_model = lambda: net  # type: ignore[method-assign]
    masks, naive = {}, {}
    for code, img in in_plane_storages(ref).items():
        src, dst = tmp_path / f"{code}.nii.gz", tmp_path / f"{code}_mask.nii.gz"
        write_image(img, src)
        task.predict_file(src, dst)
        out = read_image(dst)
        assert out.shape == img.shape and np.allclose(out.affine, img.affine)
        back = nib.orientations.ornt_transform(
            nib.orientations.io_orientation(out.affine), nib.orientations.io_orientation(ref.affine)
        )
        masks[code] = nib.orientations.apply_orientation(out.array, back)
        stored = task.predict_slices(net, np.moveaxis(img.array, 2, 0)) >= 0.5
        naive[code] = nib.orientations.apply_orientation(np.moveaxis(stored, 0, 2), back)
    assert len(masks) == 8
    first = next(iter(masks.values()))
    assert 0.02 < first.mean() < 0.98  # a non-trivial mask
    assert all(np.array_equal(m, first) for m in masks.values())
    assert not all(np.array_equal(m, next(iter(naive.values()))) for m in naive.values())
