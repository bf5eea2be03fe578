"""``medistill simulate drr`` / ``report drr`` on a tiny synthetic CT: files, geometry, resume, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import make_ct
from medistill.cli import main
from medistill.io.images import Image, read_image, write_image


def _run(args: list[str]) -> None:
    main([str(a) for a in args])


def test_simulate_writes_images_labels_geometry_and_resumes(
    ct_files: tuple[Path, Path], tmp_path: Path
) -> None:
    ct, label = ct_files
    out = tmp_path / "drr"
    args = [
        "simulate",
        "drr",
        ct,
        "--labels",
        label,
        "--out",
        out,
        "--n",
        "3",
        "--pose",
        "random",
        "--sid",
        "200",
        "--sdd",
        "300",
        "--height",
        "24",
        "--width",
        "20",
        "--spacing",
        "1.5",
        "--seed",
        "4",
        "--label-ids",
        "2,1",
    ]
    _run(args)
    geometry = json.loads((out / "geometry.json").read_text())
    assert sorted(geometry["images"]) == ["0000", "0001", "0002"]
    assert geometry["label_ids"] == [2, 1]
    entry = geometry["images"]["0001"]
    p = np.array(entry["P"])
    assert p.shape == (3, 4)
    source = np.array(entry["source_mm"] + [1.0])
    assert np.allclose(p @ source, 0.0, atol=1e-6)  # the source is P's centre
    line = read_image(out / "0001_lineint.nii.gz").array
    assert line.shape == (24, 20) and line.dtype == np.float32 and line.max() > 0
    masks = read_image(out / "0001_labels.nii.gz").array
    assert masks.shape == (24, 20, 2) and set(np.unique(masks)) <= {0, 1}
    # bone (label 2) lies inside the body (label 1) in every ray, so its mask is inside the body mask
    assert masks[..., 0].sum() > 0 and np.all(masks[..., 1][masks[..., 0] > 0] == 1)
    from PIL import Image as PILImage

    png = np.asarray(PILImage.open(out / "0001_drr.png"))
    assert png.shape == (24, 20) and png.dtype in (np.uint16, np.int32) and png.max() > 30000

    # resume: a complete image is not recomputed, a missing one is; same seed -> same pixels
    stamp = (out / "0000_lineint.nii.gz").stat().st_mtime_ns
    (out / "0002_lineint.nii.gz").unlink()
    before = line.copy()
    _run(args)
    assert (out / "0000_lineint.nii.gz").stat().st_mtime_ns == stamp
    assert (out / "0002_lineint.nii.gz").exists()
    assert np.array_equal(read_image(out / "0001_lineint.nii.gz").array, before)

    _run(["report", "drr", out])
    assert (out / "drr_grid.png").stat().st_size > 1000


def _error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        _run(args)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_bad_input_fails_before_rendering(
    ct_files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ct, label = ct_files
    out = tmp_path / "o"
    flat = tmp_path / "flat.nii.gz"
    write_image(Image(np.zeros((8, 8), np.float32), np.eye(4)), flat)
    assert "3D CT volume" in _error(["simulate", "drr", flat, "--out", out], capsys)
    other = tmp_path / "other.nii.gz"
    ct_image, _ = make_ct(shape=(12, 10, 9))
    write_image(ct_image, other)
    assert "same grid" in _error(["simulate", "drr", ct, "--labels", other, "--out", out], capsys)
    assert "inside the CT volume" in _error(["simulate", "drr", ct, "--out", out, "--sid", "1"], capsys)
    assert "spacing" in _error(["simulate", "drr", ct, "--out", out, "--spacing", "0"], capsys)
    assert "size" in _error(["simulate", "drr", ct, "--out", out, "--height", "-3"], capsys)
    assert "do not occur" in _error(
        ["simulate", "drr", ct, "--labels", label, "--label-ids", "9", "--out", out], capsys
    )
    assert not any(out.glob("*.nii.gz"))
