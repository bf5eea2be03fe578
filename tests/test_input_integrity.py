"""Inputs that used to give wrong answers silently now fail in one line, or are read correctly.

DICOM series with a copied, missing or misplaced slice; inputs a CT verb cannot use (MR, RT dose,
secondary captures, colour, values that are not HU); NaN voxels; output names that would only fail after
the work. Every CLI case runs ``medistill.cli.main`` in-process and checks exit status 2 and one line.
"""

from __future__ import annotations

import inspect
import math
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
from PIL import Image as PILImage
from pydicom.uid import MRImageStorage, RTDoseStorage, SecondaryCaptureImageStorage, generate_uid

from conftest import make_ct
from medistill.cli import main
from medistill.errors import MedistillError
from medistill.io.checks import check_output_folder, check_output_path, read_ct, require_ct
from medistill.io.images import read_image, write_image
from medistill.tasks.base import Task
from medistill.tasks.segmentation3d import Seg3DTask
from test_io_images import write_dicom

ROWS, COLS = 6, 5


def write_series(folder: Path, z_mm: list[float], angle_deg: float = 30.0, **tags: object) -> list[Path]:
    """One CT slice file per position ``z_mm`` along the normal of an oblique orientation (LPS).

    Pixels differ per slice (slice ``k`` holds ``k``), so a duplicate with other pixels is detectable;
    file names run opposite to the positions, so any correct order comes from the geometry.
    """
    folder.mkdir(parents=True, exist_ok=True)
    a = math.radians(angle_deg)
    along_row = np.array([math.cos(a), 0.0, math.sin(a)])
    along_col = np.array([0.0, 1.0, 0.0])
    normal = np.cross(along_row, along_col)
    series, study = generate_uid(), generate_uid()
    paths = []
    for k, z in enumerate(z_mm):
        ipp = np.array([0.0, 20.0, 0.0]) + z * normal  # the base point lies in the plane z = 0
        stored = np.full((ROWS, COLS), 1024 + 10 * k, np.int16)
        tags_k = {
            "Modality": "CT",
            "RescaleSlope": 1,
            "RescaleIntercept": -1024,
            **tags,
        }
        paths.append(
            write_dicom(
                folder / f"f{len(z_mm) - k:03d}.dcm",
                stored,
                SeriesInstanceUID=series,
                StudyInstanceUID=study,
                InstanceNumber=k + 1,
                ImagePositionPatient=[f"{v:.4f}" for v in ipp],
                ImageOrientationPatient=[f"{v:.6f}" for v in (*along_row, *along_col)],
                PixelSpacing=[0.8, 0.8],
                SliceThickness=2.5,
                **tags_k,
            )
        )
    return paths


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


def one_line_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code, err = run_cli(args, capsys)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


# ------------------------------------------------------------------------------------------ DICOM series


def test_a_uniform_series_with_float_jitter_reads_at_its_true_spacing(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    jitter = [0.0, 0.002, -0.003, 0.001, 0.0, -0.002]
    write_series(tmp_path / "s", [2.5 * k + j for k, j in enumerate(jitter)])
    image = read_image(tmp_path / "s")
    assert image.shape == (COLS, ROWS, 6) and image.modality == "CT"
    assert image.spacing[2] == pytest.approx(2.5, abs=1e-3)
    # slices in position order: slice k holds stored value 1024 + 10 k, i.e. 10 k HU
    np.testing.assert_array_equal(image.array[0, 0, :], 10.0 * np.arange(6))
    assert "Non uniform" not in capfd.readouterr().err  # ITK's raw warning is not printed


def test_a_copied_file_is_dropped_with_a_warning_and_the_spacing_stays_right(tmp_path: Path) -> None:
    """The copy used to make ITK read 4 files over 3 positions: 1.67 mm instead of 2.5, slices misplaced."""
    files = write_series(tmp_path / "s", [0.0, 2.5, 5.0])
    (tmp_path / "s" / "copy.dcm").write_bytes(files[1].read_bytes())
    with pytest.warns(
        UserWarning, match=r"(copy|f002)\.dcm duplicates (f002|copy)\.dcm .*z=2\.5 mm.*ignored"
    ):
        image = read_image(tmp_path / "s")
    assert image.shape == (COLS, ROWS, 3)
    assert image.spacing[2] == pytest.approx(2.5, abs=1e-4)
    np.testing.assert_array_equal(image.array[0, 0, :], [0.0, 10.0, 20.0])


def test_two_different_images_at_one_position_are_refused_naming_both(tmp_path: Path) -> None:
    write_series(tmp_path / "s", [0.0, 2.5, 2.5, 5.0])
    with pytest.raises(
        MedistillError,
        match=r"s: series .*: 2 files at the same position z=2\.5 mm .*\(f002\.dcm, f003\.dcm\)",
    ):
        read_image(tmp_path / "s")


def test_a_missing_slice_is_refused_with_the_gap_and_the_spacing(tmp_path: Path) -> None:
    write_series(tmp_path / "s", [0.0, 2.5, 5.0, 10.0, 12.5])
    with pytest.raises(MedistillError) as exc:
        read_image(tmp_path / "s")
    message = str(exc.value)
    assert (
        "slice gap of 5 mm between z=5 and z=10 mm where the spacing is 2.5 mm (1 missing slice)" in message
    )
    assert str(tmp_path / "s") in message and "\n" not in message


def test_non_uniform_spacing_is_refused(tmp_path: Path) -> None:
    write_series(tmp_path / "s", [0.0, 2.5, 5.0, 6.5, 9.0])
    with pytest.raises(
        MedistillError, match=r"non-uniform slice spacing: a step of 1\.5 mm between z=5 and z=6\.5"
    ):
        read_image(tmp_path / "s")


def test_slices_without_position_cannot_be_placed(tmp_path: Path) -> None:
    first = write_series(tmp_path / "s", [0.0, 2.5])[0]
    uid = pydicom.dcmread(first, stop_before_pixels=True).SeriesInstanceUID
    write_dicom(
        tmp_path / "s" / "lost.dcm", np.zeros((ROWS, COLS), np.int16), Modality="CT", SeriesInstanceUID=uid
    )
    with pytest.raises(MedistillError, match="lost.dcm has no ImagePositionPatient"):
        read_image(tmp_path / "s")


# --------------------------------------------------------------------------------- is it CT in HU?


def test_hu_plausibility_of_untagged_volumes() -> None:
    ct, _ = make_ct()
    assert require_ct(ct, "ct") is ct  # air at -1000, bone at 700
    metal = ct.array.copy()
    metal[0, 0, 0] = 25000.0  # one extended-scale metal voxel: the 99.9th percentile still says CT
    require_ct(ct.with_array(metal), "metal")
    cases = {
        "MR-like 0..1000": np.linspace(0, 1000, ct.array.size).reshape(ct.shape),
        "CT without its offset": ct.array + 1024.0,
        "HU x 10": ct.array * 10.0,
    }
    for name, values in cases.items():
        with pytest.raises(MedistillError, match=f"{name}: does not look like CT in HU"):
            require_ct(ct.with_array(values.astype(np.float32)), name)
    mr = ct.with_array(cases["MR-like 0..1000"].astype(np.float32))
    with pytest.raises(MedistillError, match="pass --assume-ct"):
        require_ct(mr, "mr")
    assert require_ct(mr, "mr", assume_ct=True) is mr  # the user knows better
    with pytest.raises(MedistillError, match="convert it to CT in HU first"):
        require_ct(mr, "mr", override=None)  # a verb without the flag says what to do instead


@pytest.mark.parametrize(
    ("tags", "message"),
    [
        ({"SOPClassUID": MRImageStorage, "Modality": "MR"}, "an MR image"),
        ({"SOPClassUID": RTDoseStorage, "Modality": "RTDOSE"}, "an RT dose grid"),
        ({"SOPClassUID": SecondaryCaptureImageStorage, "Modality": "CT"}, "a secondary capture"),
        ({"Modality": "CT", "ImageType": ["DERIVED", "SECONDARY"]}, "a secondary capture"),
    ],
)
def test_metal_refuses_dicom_that_is_not_ct(
    tags: dict[str, object], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_dicom(tmp_path / "x.dcm", np.full((48, 48), 100, np.uint16), PixelSpacing=[1, 1], **tags)
    err = one_line_error(["simulate", "metal", path, "--out", tmp_path / "o"], capsys)
    assert f"{path}: {message}" in err and "needs CT in Hounsfield units" in err, err
    assert not (tmp_path / "o").exists()


def test_a_derived_ct_with_a_rescale_is_still_ct(tmp_path: Path) -> None:
    mpr = {"ImageType": ["DERIVED", "SECONDARY", "MPR"], "RescaleIntercept": -1024, "RescaleSlope": 1}
    path = write_dicom(tmp_path / "mpr.dcm", np.zeros((4, 4), np.int16), Modality="CT", **mpr)
    assert read_ct(path).modality == "CT"


def test_colour_inputs_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rgb = np.zeros((48, 48, 3), np.uint8)
    rgb[..., 0] = 200  # red: really colour, not grey stored as RGB
    PILImage.fromarray(rgb).save(tmp_path / "photo.png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reader's own "converted to grey" warning
        err = one_line_error(["simulate", "metal", tmp_path / "photo.png", "--out", tmp_path / "o"], capsys)
    assert "photo.png: a colour image" in err, err
    dcm = write_dicom(
        tmp_path / "rgb.dcm", None, Modality="CT", Rows=4, Columns=4, SamplesPerPixel=3,
        PhotometricInterpretation="RGB", PlanarConfiguration=0, BitsAllocated=8, BitsStored=8, HighBit=7,
        PixelRepresentation=0, PixelData=bytes(4 * 4 * 3),
    )  # fmt: skip
    err = one_line_error(["simulate", "metal", dcm, "--out", tmp_path / "o"], capsys)
    assert "rgb.dcm: colour DICOM (PhotometricInterpretation RGB, 3 samples per pixel)" in err, err


def test_drr_refuses_an_mr_series_and_an_mr_like_nifti_unless_told(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_series(tmp_path / "mr", [0.0, 2.5, 5.0], SOPClassUID=MRImageStorage, Modality="MR")
    err = one_line_error(["simulate", "drr", tmp_path / "mr", "--out", tmp_path / "o"], capsys)
    assert "mr: an MR image" in err, err
    ct, _ = make_ct()
    mr = ct.with_array(np.abs(ct.array) % 1000)  # 0..999, no negative values: a typical MR range
    write_image(mr, tmp_path / "mr.nii.gz")
    small = ["--height", "8", "--width", "8"]
    err = one_line_error(["simulate", "drr", tmp_path / "mr.nii.gz", "--out", tmp_path / "o", *small], capsys)
    assert "does not look like CT in HU" in err and "pass --assume-ct" in err, err
    assert not (tmp_path / "o").exists()
    code, err = run_cli(
        ["simulate", "drr", tmp_path / "mr.nii.gz", "--out", tmp_path / "o", *small, "--assume-ct"], capsys
    )
    assert code == 0, err
    assert (tmp_path / "o" / "0000_drr.png").exists()


def test_seg3d_predict_refuses_mr_before_the_model_runs(tmp_path: Path) -> None:
    ct, _ = make_ct()
    write_image(ct.with_array(np.abs(ct.array) % 1000), tmp_path / "mr.nii.gz")
    nothing = SimpleNamespace()  # the check is predict_file's first line: it needs no task state, no model
    models = [{}] * (
        len(inspect.signature(Seg3DTask.predict_file).parameters) - 3
    )  # (self, [models,] src, dst)
    with pytest.raises(MedistillError, match="mr.nii.gz: does not look like CT in HU.*convert it"):
        Seg3DTask.predict_file(nothing, *models, tmp_path / "mr.nii.gz", tmp_path / "pred.nii.gz")
    assert not (tmp_path / "pred.nii.gz").exists()


# --------------------------------------------------------------------------------------- NaN voxels


@pytest.mark.parametrize("suffix", [".nii.gz", ".mha"])
def test_nan_and_inf_voxels_are_refused_at_read_time(
    suffix: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ct, _ = make_ct()
    values = ct.array.copy()
    values[1, 2, 3] = np.nan
    values[4, 5, 6] = np.nan
    values[0, 0, 0] = np.inf
    path = tmp_path / f"nan{suffix}"
    write_image(ct.with_array(values), path)
    with pytest.raises(MedistillError, match=r"3 of 960 voxels are not finite \(2 NaN, 1 infinite\)"):
        read_image(path)
    err = one_line_error(["simulate", "drr", path, "--out", tmp_path / "o"], capsys)
    assert f"{path}: 3 of 960 voxels are not finite" in err, err


# ----------------------------------------------------------------------------------- output paths


def test_check_output_path_knows_image_endings_inputs_and_folders(tmp_path: Path) -> None:
    src = tmp_path / "ct.nii.gz"
    write_image(make_ct()[0], src)
    assert (
        check_output_path(tmp_path / "new" / "deeper" / "PRED.NII.GZ") == tmp_path / "new/deeper/PRED.NII.GZ"
    )
    for bad, message in [
        (tmp_path / "pred.txt", r"unknown output format \.txt; use one of \.nii\.gz"),
        (tmp_path / "pred", r"unknown output format \(no extension\)"),
        (src, "is the input"),
        (tmp_path, "unknown output format"),
        (src / "x.nii.gz", "ct.nii.gz is a file, so the folder cannot be created"),
    ]:
        with pytest.raises(MedistillError, match=message):
            check_output_path(bad, inputs=[src])
    (tmp_path / "d.nii.gz").mkdir()
    with pytest.raises(MedistillError, match="is a folder"):
        check_output_path(tmp_path / "d.nii.gz")
    with pytest.raises(MedistillError, match="is a file; this writes a folder"):
        check_output_folder(src)
    with pytest.raises(MedistillError, match="is the input"):
        check_output_folder(tmp_path, inputs=[tmp_path])


@pytest.fixture
def image_run(tmp_path: Path) -> Path:
    """A run folder of an image-writing task (lung2d) with its config and no weights."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(Path("configs/lung2d.yaml").read_text())
    return run


def test_predict_refuses_a_bad_output_name_before_loading_any_model(
    image_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_model(*_: object, **__: object) -> None:
        raise AssertionError("a model was loaded before the output was checked")

    for loader in ("load_models", "stage_model"):  # whichever way the task loads its weights
        monkeypatch.setattr(Task, loader, no_model, raising=False)
    src = tmp_path / "ct.nii.gz"
    write_image(make_ct()[0], src)
    for out, message in [
        (tmp_path / "pred.nii.gzz", "unknown output format .nii.gzz"),
        (tmp_path / "pred.jpg", "unknown output format .jpg"),
        (src, "is the input"),
    ]:
        start = time.perf_counter()
        err = one_line_error(["predict", image_run, src, "--out", out], capsys)
        assert message in err and time.perf_counter() - start < 5.0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz", "run"]  # nothing written


def test_simulate_verbs_refuse_an_output_folder_that_is_a_file(
    ct_files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ct, _ = ct_files
    taken = tmp_path / "taken.txt"
    taken.write_text("not a folder")
    for verb in ("drr", "metal"):
        err = one_line_error(["simulate", verb, ct, "--out", taken], capsys)
        assert "taken.txt is a file; this writes a folder" in err, err
    err = one_line_error(["simulate", "cohort", "--out", taken, "--n", "3"], capsys)
    assert "taken.txt is a file" in err, err
