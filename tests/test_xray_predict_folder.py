"""`medistill predict RUN FOLDER --out OUT` for the X-ray task: every radiograph of a folder segmented with
one loaded model into OUT/<stem>/, a summary with the anatomical plausibility of each, and the folder
checks that come before any work. The run is a tiny teacher trained for a few steps on DRRs of the real
chest-ct (64 x 64): enough to produce masks, not to be right."""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml

from example_data import require_example
from medistill.cli import main
from medistill.io.images import Image, read_image, write_image
from medistill.metrics.plausibility import chest_plausibility
from medistill.tasks.xray import XrayBonesTask
from medistill.tasks.xray_data import window

CLASSES = ["ribs", "vertebrae", "clavicles", "scapulae", "sternum", "humeri", "lungs", "heart"]
UNET = {"name": "unet", "args": {"features": [4, 8, 16], "norm": "batch", "upsample": "nearest_conv"}}
CONFIG = {
    "name": "xray-folder-test",
    "task": "xray_bones",
    "seed": 0,
    "data": {
        "example": "chest-ct",
        "classes": CLASSES,
        "size": 64,
        "volume_step": [8, 8, 2],
        "n_train": 4,
        "n_val": 2,
        "n_test": 2,
    },
    "stages": [
        {
            "name": "teacher",
            "set": {"data.preprocessing": "none"},
            "models": {"net": UNET},
            "losses": {"sup": {"name": "dice_bce"}},
        }
    ],
    "export": ["teacher.net"],
    "infer": {"stage": "teacher", "threshold": "val"},
    "train": {
        "steps": 6,
        "batch_size": 2,
        "lr": 0.01,
        "val_every": 6,
        "checkpoint_every": 6,
        "num_workers": 0,
        "progress": False,
    },
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_example("chest-ct")
    folder = tmp_path_factory.mktemp("xray_folder")
    (folder / "tiny.yaml").write_text(yaml.safe_dump(CONFIG))
    main(["train", str(folder / "tiny.yaml"), "--out", str(folder / "run")])
    return folder / "run"


@pytest.fixture
def radiographs(tiny_run: Path, tmp_path: Path) -> Path:
    """A folder with RG1 (a real CR chest film, DICOM, no pixel spacing) and a held-out DRR of the run
    as an 8-bit PNG at 4x the model's resolution (its spacing stored), plus things that are not inputs."""
    from medistill.runs import open_run

    folder = tmp_path / "films"
    folder.mkdir()
    shutil.copy(require_example("radiographs") / "RG1_UNCR.dcm", folder)
    task = open_run(tiny_run)
    drr = window(task.renders()["test"]["line_integral"][0], task.cfg.data.window_percentiles)
    big = np.kron(drr, np.ones((4, 4)))
    pitch = task.pixel_mm / 4
    write_image(
        Image((big * 255).astype(np.uint8), np.diag([pitch, pitch, 1.0, 1.0])),
        folder / "drr.png",
        dtype=np.uint8,
    )
    (folder / "notes.txt").write_text("not a radiograph")
    (folder / "sub").mkdir()
    shutil.copy(folder / "drr.png", folder / "sub" / "deeper.png")  # not searched: non-recursive
    return folder


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}


@pytest.mark.slow
def test_a_folder_is_segmented_with_one_model_and_summarised(
    tiny_run: Path, radiographs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads = []
    original = XrayBonesTask.stage_model
    monkeypatch.setattr(
        XrayBonesTask, "stage_model", lambda self, *a, **k: loads.append(a) or original(self, *a, **k)
    )
    before = digests(radiographs)
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match=r"RG1_UNCR.dcm: no pixel spacing .*assuming the image spans"):
        main(["predict", str(tiny_run), str(radiographs), "--out", str(out)])
    assert len(loads) == 1  # one model load for the whole folder
    assert digests(radiographs) == before  # inputs untouched
    assert sorted(p.name for p in out.iterdir()) == ["RG1_UNCR", "drr", "summary.json"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_inputs"] == 2 and summary["n_failed"] == 0 and summary["model"] == "teacher"
    assert list(summary["files"]) == ["RG1_UNCR.dcm", "drr.png"]  # sorted; notes.txt and sub/ ignored
    for name, stem, shape in [("RG1_UNCR.dcm", "RG1_UNCR", (1955, 1841)), ("drr.png", "drr", (256, 256))]:
        entry, dst = summary["files"][name], out / stem
        assert entry["output"] == str(dst)
        info = json.loads((dst / f"{stem}_classes.json").read_text())
        assert entry["fraction_of_image_per_class"] == info["fraction_of_image_per_class"]
        masks = {}
        for c in CLASSES:
            m = read_image(dst / f"{stem}_{c}.png").array
            assert m.shape == shape and set(np.unique(m)) <= {0, 255}  # on the input's own pixel grid
            masks[c] = m > 0
            assert abs(entry["fraction_of_image_per_class"][c] - masks[c].mean()) < 1e-9
        # the verdict is the one of the masks as written
        assert entry["plausibility"] == json.loads(json.dumps(chest_plausibility(masks)))
        assert isinstance(entry["plausibility"]["plausible"], bool)
        assert set(entry["plausibility"]["checks"]) >= {"two_lung_fields", "heart_towards_patient_left"}
    assert summary["n_plausible"] == sum(e["plausibility"]["plausible"] for e in summary["files"].values())


@pytest.mark.slow
def test_the_run_s_drr_labels_are_plausible_and_mirrored_ones_put_the_heart_wrong(tiny_run: Path) -> None:
    """The checks against the anatomy the model was trained on: every DRR label of the run (AP and PA,
    shown with the patient's right on the image's left) passes; flipped left-right, the heart is on the
    patient's right."""
    from medistill.runs import open_run

    task = open_run(tiny_run)
    for split in ("train", "val", "test"):
        for labels in task.renders()[split]["masks"]:
            masks = dict(zip(CLASSES, labels, strict=True))
            verdict = chest_plausibility(masks)
            assert verdict["plausible"], (split, verdict["failed"])
            mirrored = chest_plausibility({k: v[:, ::-1] for k, v in masks.items()})
            assert "heart_towards_patient_left" in mirrored["failed"]
            assert mirrored["checks"]["two_lung_fields"]["ok"]  # the lungs alone cannot tell


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(args)
    return int(exc.value.code or 0), capsys.readouterr().err


@pytest.mark.slow
def test_bad_folders_are_refused_before_any_work(
    tiny_run: Path, radiographs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no films here")
    code, err = run_cli(["predict", str(tiny_run), str(empty), "--out", str(tmp_path / "o1")], capsys)
    assert (
        code == 2 and f"{empty}: no radiographs in this folder" in err and len(err.strip().splitlines()) == 1
    )
    assert not (tmp_path / "o1").exists()

    twins = tmp_path / "twins"
    twins.mkdir()
    shutil.copy(radiographs / "drr.png", twins / "chest.png")
    shutil.copy(radiographs / "RG1_UNCR.dcm", twins / "Chest.dcm")
    code, err = run_cli(["predict", str(tiny_run), str(twins), "--out", str(tmp_path / "o2")], capsys)
    assert code == 2 and "Chest.dcm and chest.png have the same stem" in err
    assert not (tmp_path / "o2").exists()

    code, err = run_cli(["predict", str(tiny_run), str(twins), "--out", str(twins)], capsys)
    assert code == 2 and "is the input" in err

    # OUT inside the input folder: refused when it already holds other files, fine when new
    only = tmp_path / "only"
    only.mkdir()
    shutil.copy(radiographs / "drr.png", only / "drr.png")
    (only / "kept").mkdir()
    (only / "kept" / "film.png").write_bytes((only / "drr.png").read_bytes())
    code, err = run_cli(["predict", str(tiny_run), str(only), "--out", str(only / "kept")], capsys)
    assert code == 2 and "lies inside the input folder and already holds other files (film.png)" in err
    before = digests(only)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the PNG stores its spacing: nothing assumed
        main(["predict", str(tiny_run), str(only), "--out", str(only / "pred")])
    assert digests(only) == before and (only / "pred" / "drr" / "drr_lungs.png").is_file()
    # the same call again: the earlier outputs are its own kind, so it may overwrite them
    main(["predict", str(tiny_run), str(only), "--out", str(only / "pred")])
    assert json.loads((only / "pred" / "summary.json").read_text())["n_inputs"] == 1

    # a file that cannot be read: recorded, the others still segmented, then one line and exit 2
    (only / "broken.png").write_text("not a PNG")
    code, err = run_cli(["predict", str(tiny_run), str(only), "--out", str(tmp_path / "o3")], capsys)
    assert code == 2 and f"1 of 2 radiographs in {only} failed (broken.png)" in err
    summary = json.loads((tmp_path / "o3" / "summary.json").read_text())
    assert "not a readable PNG/TIFF image" in summary["files"]["broken.png"]["error"]
    assert summary["files"]["drr.png"]["plausibility"] is not None and summary["n_failed"] == 1
