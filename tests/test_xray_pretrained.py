"""The shipped X-ray student (``models/xray-bones``: the flagship's distilled student, trained on DRRs of
one CT only) segments the real RG1 chest film plausibly: both lung fields in their own image halves at a
sensible size, the heart between them towards the patient's left and low in the chest, judged by
:func:`medistill.metrics.plausibility.chest_plausibility` (RG1 has no reference mask)."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np

from example_data import require_example
from medistill.cli import main
from medistill.io.images import read_image
from medistill.metrics.plausibility import chest_plausibility

MODEL = Path("models/xray-bones")


def test_shipped_student_is_plausible_on_rg1(tmp_path: Path) -> None:
    rg1 = require_example("radiographs") / "RG1_UNCR.dcm"
    run = tmp_path / "run"
    shutil.copytree(MODEL, run)  # predict never writes into the shipped folder
    out = tmp_path / "rg1"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # RG1 has no pixel spacing: the field is assumed
        main(["predict", str(run), str(rg1), "--out", str(out)])
    info = json.loads((out / "RG1_UNCR_classes.json").read_text())
    masks = {c: read_image(out / f"RG1_UNCR_{c}.png").array > 0 for c in info["classes"]}
    assert next(iter(masks.values())).shape == (1955, 1841)  # on the film's own grid
    check = chest_plausibility(masks)
    assert check["plausible"], check["failed"]
    lungs = masks["lungs"]
    halves = [lungs[:, : lungs.shape[1] // 2].mean() / 2, lungs[:, lungs.shape[1] // 2 :].mean() / 2]
    assert all(0.03 <= f <= 0.30 for f in halves), halves
    # the validation thresholds came with the model: no DRR was rendered to predict
    assert not (run / "drr").exists()
    assert (
        info["thresholds"] == json.loads((run / info["model"] / "thresholds.json").read_text())["thresholds"]
    )
    assert np.isclose(info["model_pixel_mm"], 430.0 / 256)
