"""System C end to end at toy scale: teacher -> LCOV-Net + CAKD/MSKD -> no-KD student, via the CLI.

The cohort comes from a small analytic abdomen (:func:`phantom_abdomen`), not chest-ct, so the whole
pipeline (train 3 stages, evaluate, report, predict, export) runs in seconds of CPU time.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from medistill.cli import main
from medistill.config import validate_config
from medistill.engine.checkpoint import save_checkpoint
from medistill.errors import MedistillError
from medistill.io.images import Image, read_image, write_image
from medistill.tasks.cohort import WORD_LABELS, CohortSpec, make_cohort, phantom_abdomen
from medistill.tasks.segmentation3d import Seg3DTask, lr_mirror, organ_scores

TINY = {
    "name": "seg3d-test",
    "task": "seg3d",
    "seed": 0,
    "data": {
        "spacing_mm": [3.5, 3.5, 3.5],
        "patch": [32, 32, 32],
        "fg_fraction": 1.0,
        "rotate_deg": 0,
        "scale": 0,
        "flip_lr": 0,
        "noise": 0,
        "intensity": 0,
        "sw_overlap": 0.25,
    },
    "stages": [
        {
            "name": "teacher",
            "models": {
                "net": {
                    "name": "dynunet_teacher",
                    "args": {"features": [8, 16, 32, 64, 64], "strides": [1, 2, 2, 2, 2]},
                }
            },
            "losses": {"seg": {"name": "deep_supervision", "args": {"loss": "dice_ce"}}},
            "steps": 16,  # liver Dice 0.63-0.75 over seeds 0-2 at 16 steps (0.39-0.77 at 10: too noisy)
        },
        {
            "name": "student_kd",
            "models": {"net": {"name": "lcovnet", "args": {"features": [4, 8, 16, 32, 32], "dropout": 0.0}}},
            "frozen": {"teacher": {"stage": "teacher", "scales": True}},
            "losses": {"seg": {"name": "deep_supervision", "args": {"loss": "dice_ce"}}},
            "distillers": {"cakd": {"name": "cakd"}, "mskd": {"name": "mskd", "args": {"temperature": 2.0}}},
        },
        {
            "name": "student_nokd",
            "models": {"net": {"name": "lcovnet", "args": {"features": [4, 8, 16, 32, 32], "dropout": 0.0}}},
            "losses": {"seg": {"name": "deep_supervision", "args": {"loss": "dice_ce"}}},
        },
    ],
    "export": ["teacher.net", "student_kd.net"],
    "train": {
        "steps": 6,
        "batch_size": 2,
        "lr": 0.01,
        "lr_schedule": "constant",
        "val_every": 100,
        "log_every": 1,
        "checkpoint_every": 100,
        "progress": False,
    },
}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cohort")
    spec = CohortSpec(n_subjects=4, spacing_mm=(3.5, 3.5, 3.5), min_volume_ml=2.0, split=(0.5, 0.25, 0.25))
    make_cohort(root, spec, *phantom_abdomen())
    return root


def config(tmp: Path, dataset: Path, **sections: dict) -> Path:
    raw = json.loads(json.dumps(TINY))
    raw["data"]["dataset"] = str(dataset)
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    path = tmp / f"{raw['name']}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def task_for(tmp: Path, dataset: Path, **sections: dict) -> Seg3DTask:
    raw = yaml.safe_load(config(tmp, dataset, **sections).read_text())
    return Seg3DTask(validate_config(raw), tmp / "run")


def stage_losses(run: Path, stage: str, key: str = "loss") -> list[float]:
    rows = [json.loads(ln) for ln in (run / stage / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if r["phase"] == "train"]


@pytest.mark.slow
def test_three_stages_learn_evaluate_predict_and_export(tmp_path: Path, cohort: Path) -> None:
    run = tmp_path / "run"
    main(["run", str(config(tmp_path, cohort / "dataset.json")), "--out", str(run)])
    for stage in ("teacher", "student_kd", "student_nokd"):
        losses = stage_losses(run, stage)
        assert np.mean(losses[-3:]) < np.mean(losses[:3]), (stage, losses)  # a learning signal
    kd = stage_losses(run, "student_kd", "loss_mskd")
    assert kd[-1] < kd[0]  # the student moves towards the frozen teacher
    result = json.loads((run / "eval" / "metrics.json").read_text())
    assert set(result["cases"]) == {"teacher", "student_kd", "student_nokd"}
    assert result["cases"]["student_kd"]["params"] < result["cases"]["teacher"]["params"] / 5
    # stated bound: after 16 steps the teacher finds the liver (an untrained net scores ~0.1 at best)
    assert result["per_organ"]["teacher"]["liver"]["dice"] > 0.5
    assert (run / "eval" / "overlay.png").exists() and (run / "report.html").exists()

    test_id = json.loads((cohort / "splits.json").read_text())["test"][0]
    src = cohort / "imagesTr" / f"{test_id}.nii.gz"
    pred_path = tmp_path / "pred.nii.gz"
    main(["predict", str(run), str(src), "--out", str(pred_path)])
    pred, image = nib.load(pred_path), nib.load(src)
    assert pred.shape == image.shape and np.allclose(pred.affine, image.affine)  # input geometry (LAS)
    labels = np.asarray(pred.dataobj)
    assert set(np.unique(labels).tolist()) <= set(WORD_LABELS.values())

    main(["export", str(run)])
    parity = json.loads((run / "export" / "parity.json").read_text())
    assert set(parity) == {"teacher.net", "student_kd.net"}
    assert all(
        p["max_abs_diff"] < 1e-3 and p["inputs"] == {"image": [1, 1, 32, 32, 32]} for p in parity.values()
    )
    from medistill.deploy.export import read_contract

    contract = read_contract(run / "export" / "student_kd.net.onnx")
    assert contract == json.loads((run / "export" / "student_kd.net.json").read_text())
    assert contract["normalisation"] == json.loads((run / "student_kd" / "normalisation.json").read_text())

    main(["bench", str(run), "--repeats", "5"])
    profile = json.loads((run / "bench" / "profile.json").read_text())
    assert [r["model"] for r in profile["rows"]] == ["teacher.net", "student_kd.net"]
    student = profile["ratios"][1]
    assert student["params_ratio"] > 5 and student["macs_ratio"] > 1 and student["speedup_best"] > 0


def test_label_values_outside_the_label_list_fail_before_training(tmp_path: Path, cohort: Path) -> None:
    bad = tmp_path / "bad"
    make_cohort(bad, CohortSpec(n_subjects=3, spacing_mm=(3.5,) * 3, min_volume_ml=2.0), *phantom_abdomen())
    label_path = bad / "labelsTr" / "subject_001.nii.gz"
    lab = read_image(label_path)
    stray = lab.array.copy()
    stray[0, 0, 0] = 42
    write_image(lab.with_array(stray), label_path)
    with pytest.raises(MedistillError, match="42"):
        task_for(tmp_path, bad / "dataset.json").build_data()


def test_image_label_grid_mismatch_fails(tmp_path: Path) -> None:
    bad = tmp_path / "grid"
    make_cohort(bad, CohortSpec(n_subjects=3, spacing_mm=(3.5,) * 3, min_volume_ml=2.0), *phantom_abdomen())
    label_path = bad / "labelsTr" / "subject_002.nii.gz"
    lab = read_image(label_path)
    shifted = lab.affine.copy()
    shifted[0, 3] += 7.0
    write_image(Image(lab.array, shifted), label_path)
    with pytest.raises(MedistillError, match="same grid"):
        task_for(tmp_path, bad / "dataset.json").build_data()


def test_patch_larger_than_the_resampled_volume_fails(tmp_path: Path, cohort: Path) -> None:
    task = task_for(tmp_path, cohort / "dataset.json", data={"patch": [32, 32, 32], "spacing_mm": [6, 6, 6]})
    with pytest.raises(MedistillError, match="larger than the volume"):
        task.build_data()


def test_teacher_checkpoint_for_other_classes_is_refused(tmp_path: Path, cohort: Path) -> None:
    """A frozen teacher from a checkpoint file made for other classes fails naming the file and the fit."""
    task = task_for(tmp_path, cohort / "dataset.json")
    spec = task.cfg.stages[0].models["net"]
    other = task.build_model("net", spec, probe=True)  # 2 classes, the cohort has more
    path = tmp_path / "teacher_other.pt"
    save_checkpoint({"models": {"net": other.state_dict()}, "model_specs": {"net": spec.model_dump()}}, path)
    student = {**TINY["stages"][1], "frozen": {"teacher": {"checkpoint": str(path), "scales": True}}}
    raw = yaml.safe_load(config(tmp_path, cohort / "dataset.json").read_text()) | {
        "stages": [student],
        "export": None,
    }
    task = Seg3DTask(validate_config(raw), tmp_path / "run2")
    with pytest.raises(MedistillError, match=r"teacher_other\.pt does not fit dynunet_teacher"):
        task.runner.run()
    assert not (tmp_path / "run2" / "student_kd").exists()


def test_left_right_flip_swaps_paired_organs() -> None:
    labels = {"background": 0, "liver": 1, "kidney_left": 3, "kidney_right": 4, "spleen": 2}
    swap = lr_mirror(labels, [0, 1, 2, 3, 4])
    assert swap.tolist() == [0, 1, 2, 4, 3]


def test_organ_scores_are_perfect_on_truth_and_hd95_in_mm() -> None:
    truth = np.zeros((20, 20, 20), np.int64)
    truth[5:10, 5:10, 5:10] = 3
    shifted = np.roll(truth, 2, axis=0)
    same = organ_scores(truth, truth, {1: "kidney"}, [0, 3], (2.0, 2.0, 2.0))
    assert same["dice_kidney"] == 1.0 and same["hd95_kidney"] == 0.0
    off = organ_scores(shifted, truth, {1: "kidney"}, [0, 3], (2.0, 2.0, 2.0))
    assert off["dice_kidney"] == pytest.approx(0.6) and off["hd95_kidney"] == pytest.approx(4.0)


def test_volume_zscore_normalises_the_whole_volume_in_ras(tmp_path: Path) -> None:
    """The earlier scheme (kept to evaluate models trained with it): the input volume's own z-score."""
    from medistill.tasks.segmentation3d import Normalisation, preprocess

    ct, _ = phantom_abdomen()
    vol = preprocess(ct, (4.0, 4.0, 4.0), Normalisation("volume_zscore", (-160.0, 240.0)))
    assert vol.image.shape == (40, 40, 48)  # 80 x 2 mm, 80 x 2 mm, 48 x 4 mm at 4 mm
    assert abs(float(vol.image.mean())) < 1e-3 and abs(float(vol.image.std()) - 1) < 1e-3
    assert np.all(np.diag(vol.affine)[:3] > 0)  # RAS: the LAS input's x axis was flipped
    assert torch.is_tensor(torch.from_numpy(vol.image))


def test_onnx_takes_other_sizes_and_carries_the_contract(tmp_path: Path, cohort: Path) -> None:
    """The exported student runs at a size it was not traced at (dynamic spatial axes) and matches
    PyTorch there; its metadata holds the preprocessing contract (normalisation statistics, spacing,
    labels) that the task gives."""
    from medistill.deploy.export import contract_metadata, export_onnx, onnx_session, read_contract
    from medistill.nets.lcovnet import LCOVNet

    task = task_for(tmp_path, cohort / "dataset.json")
    stage_dir = tmp_path / "run" / "student_kd"
    stage_dir.mkdir(parents=True)
    (stage_dir / "normalisation.json").write_text(json.dumps(task.normalisation().to_dict()))
    contract = task.deploy_contract("student_kd", "net")
    torch.manual_seed(0)
    net = LCOVNet(3, 1, task.n_classes, features=(4, 8, 8, 8, 8), dropout=0.0).eval()
    path = export_onnx(
        net,
        {"image": torch.randn(1, 1, 32, 32, 32)},
        tmp_path / "s.onnx",
        dynamic_spatial=True,
        metadata=contract_metadata(contract),
    )
    other = torch.randn(1, 1, 48, 32, 64)
    with torch.no_grad():
        ref = net(other).numpy()
    out = onnx_session(path).run(None, {"image": other.numpy()})[0]
    assert out.shape == ref.shape == (1, task.n_classes, 48, 32, 64)
    assert float(np.max(np.abs(out - ref))) < 1e-4
    back = read_contract(path)
    assert back == json.loads(json.dumps(contract))
    norm = back["normalisation"]
    assert norm["scheme"] == "ct_fixed" and norm["clip_hu"][0] < norm["mean_hu"] < norm["clip_hu"][1]
    assert back["spacing_mm"] == [3.5, 3.5, 3.5] and back["labels"]["1"] == {"name": "liver", "value": 1}
