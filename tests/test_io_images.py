"""Image I/O: round trips keep values, dtype and geometry; DICOM lands in RAS; bad input fails clearly."""

from __future__ import annotations

import gzip
import math
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from PIL import Image as PILImage
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from medistill.errors import MedistillError
from medistill.io.images import (
    Image,
    check_same_grid,
    read_channels,
    read_grid,
    read_image,
    read_radiograph,
    write_channels,
    write_image,
)

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


def write_dicom(path: Path, pixels: np.ndarray | None, **tags: object) -> Path:
    """Write a minimal but valid DICOM file (explicit VR little endian) with the given tags."""
    sop_class = str(tags.pop("SOPClassUID", CTImageStorage))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = "synthetic"
    ds.StudyInstanceUID = tags.pop("StudyInstanceUID", generate_uid())
    ds.SeriesInstanceUID = tags.pop("SeriesInstanceUID", generate_uid())
    for key, value in tags.items():
        setattr(ds, key, value)
    if pixels is not None:
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = tags.get("PhotometricInterpretation", "MONOCHROME2")
        ds.BitsAllocated = 16
        ds.BitsStored = int(tags.get("BitsStored", 16))
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def write_ct_series(folder: Path, stored: np.ndarray, angle_deg: float = 20.0) -> np.ndarray:
    """Write stored int16 slices ``(slices, rows, cols)`` as an oblique CT series; return the RAS affine.

    Slope 2 and intercept -1024 make HU differ from the stored values, so a reader that skips the
    modality LUT fails. The expected affine is built from the DICOM definitions directly.
    """
    folder.mkdir()
    a = math.radians(angle_deg)
    along_row = np.array([math.cos(a), math.sin(a), 0.0])  # column index grows this way (LPS)
    along_col = np.array([-math.sin(a), math.cos(a), 0.0])  # row index grows this way (LPS)
    normal = np.cross(along_row, along_col)
    row_spacing, col_spacing, step = 0.7, 0.9, 2.5
    first = np.array([-50.0, 30.0, 100.0])
    series, study = generate_uid(), generate_uid()
    for k in range(stored.shape[0]):
        ipp = first + k * step * normal
        write_dicom(
            folder / f"s{stored.shape[0] - k:03d}.dcm",  # file names in reverse order: sorting is by IPP
            stored[k],
            Modality="CT",
            SeriesInstanceUID=series,
            StudyInstanceUID=study,
            InstanceNumber=k + 1,
            ImagePositionPatient=[f"{v:.4f}" for v in ipp],
            ImageOrientationPatient=[f"{v:.6f}" for v in (*along_row, *along_col)],
            PixelSpacing=[row_spacing, col_spacing],
            SliceThickness=step,
            RescaleSlope=2,
            RescaleIntercept=-1024,
        )
    lps = np.eye(4)
    lps[:3, 0] = along_row * col_spacing  # array axis 0 = DICOM columns (x)
    lps[:3, 1] = along_col * row_spacing  # array axis 1 = DICOM rows (y)
    lps[:3, 2] = normal * step
    lps[:3, 3] = first
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


# ------------------------------------------------------------------------------------------- the type


def test_image_geometry_properties() -> None:
    affine = np.array([[0, -2.0, 0, 10], [3.0, 0, 0, 20], [0, 0, 0.5, 30], [0, 0, 0, 1]])
    image = Image(np.zeros((4, 5, 6), np.float32), affine)
    assert image.spacing == pytest.approx((3.0, 2.0, 0.5))
    assert image.origin == pytest.approx((10, 20, 30))
    np.testing.assert_allclose(image.direction, [[0, -1, 0], [1, 0, 0], [0, 0, 1]])
    assert image.shape == (4, 5, 6) and image.ndim == 3
    with pytest.raises(MedistillError, match="2 or 3 spatial axes"):
        Image(np.zeros((2, 3, 4, 5)), np.eye(4))


# ---------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha", ".mhd", ".nrrd"])
@pytest.mark.parametrize("which", ["ct", "label"])
def test_volume_round_trip_keeps_values_dtype_and_affine(
    tmp_path: Path, ct_pair: tuple[Image, Image], suffix: str, which: str
) -> None:
    image = ct_pair[0] if which == "ct" else ct_pair[1]
    path = tmp_path / f"vol{suffix}"
    write_image(image, path)
    back = read_image(path)
    assert back.array.dtype == image.array.dtype
    np.testing.assert_array_equal(back.array, image.array)
    np.testing.assert_allclose(back.affine, image.affine, atol=1e-5)
    assert back.spacing == pytest.approx(image.spacing)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp leftovers


def test_itk_files_agree_with_nibabel_reading_of_the_same_volume(
    tmp_path: Path, ct_pair: tuple[Image, Image]
) -> None:
    """Independent check of the LPS->RAS flip and the (z,y,x)->(x,y,z) transpose: SimpleITK converts our
    MHA to NIfTI by itself, nibabel reads that, and both views must be voxel-for-voxel identical."""
    ct = ct_pair[0]
    write_image(ct, tmp_path / "ct.mha")
    sitk.WriteImage(sitk.ReadImage(str(tmp_path / "ct.mha")), str(tmp_path / "via_itk.nii.gz"))
    nib_img = nib.load(str(tmp_path / "via_itk.nii.gz"))
    np.testing.assert_array_equal(np.asanyarray(nib_img.dataobj), ct.array)
    np.testing.assert_allclose(nib_img.affine, ct.affine, atol=1e-5)


def test_2d_mha_round_trip_rows_and_columns(tmp_path: Path) -> None:
    array = np.arange(12, dtype=np.int16).reshape(3, 4)  # 3 rows, 4 columns
    image = Image(array, np.diag([0.5, 0.25, 1.0, 1.0]))
    write_image(image, tmp_path / "slice.mha")
    itk = sitk.ReadImage(str(tmp_path / "slice.mha"))
    assert itk.GetSize() == (4, 3)  # ITK (x = columns, y = rows)
    assert itk.GetSpacing() == pytest.approx((0.25, 0.5))
    back = read_image(tmp_path / "slice.mha")
    np.testing.assert_array_equal(back.array, array)
    np.testing.assert_allclose(back.affine, image.affine)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_png_round_trip_keeps_bit_depth_and_geometry(tmp_path: Path, dtype: type) -> None:
    top = np.iinfo(dtype).max
    array = np.linspace(0, top, 35).astype(dtype).reshape(5, 7)
    affine = np.diag([0.3, 0.2, 1.0, 1.0])
    affine[:3, 3] = [1.0, 2.0, 3.0]
    write_image(Image(array, affine), tmp_path / "x.png")
    with PILImage.open(tmp_path / "x.png") as im:
        assert np.asarray(im).max() == top  # other programs see the full bit depth
    back = read_image(tmp_path / "x.png")
    assert back.array.dtype == dtype
    np.testing.assert_array_equal(back.array, array)
    np.testing.assert_allclose(back.affine, affine)
    assert back.spacing == pytest.approx((0.3, 0.2))


def test_png_refuses_float_and_tiff_keeps_it(tmp_path: Path) -> None:
    image = Image(np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4), np.eye(4))
    with pytest.raises(MedistillError, match=r"x\.png.*float32.*dtype="):
        write_image(image, tmp_path / "x.png")
    write_image(image, tmp_path / "x.tif")
    back = read_image(tmp_path / "x.tif")
    assert back.array.dtype == np.float32
    np.testing.assert_array_equal(back.array, image.array)


def test_foreign_png_without_geometry_reads_with_unit_spacing(tmp_path: Path) -> None:
    PILImage.fromarray(np.full((4, 6), 9, np.uint8)).save(tmp_path / "plain.png")
    image = read_image(tmp_path / "plain.png")
    assert image.shape == (4, 6) and image.spacing == (1.0, 1.0)
    with pytest.warns(UserWarning, match=r"plain\.png.*assuming 1\.0 mm"):
        radiograph = read_radiograph(tmp_path / "plain.png")
    assert radiograph.array.dtype == np.float32


def test_channels_round_trip_as_4d_nifti(tmp_path: Path, ct_pair: tuple[Image, Image]) -> None:
    ct, label = ct_pair
    write_channels([ct.array, label.array.astype(np.float32)], ct.affine, tmp_path / "multi.nii.gz")
    assert nib.load(str(tmp_path / "multi.nii.gz")).shape == (*ct.shape, 2)
    channels = read_channels(tmp_path / "multi.nii.gz")
    assert len(channels) == 2
    np.testing.assert_array_equal(channels[0].array, ct.array)
    np.testing.assert_array_equal(channels[1].array, label.array)
    with pytest.raises(MedistillError, match="multi.nii.gz.*2 channels.*read_channels"):
        read_image(tmp_path / "multi.nii.gz")
    grid = read_grid(tmp_path / "multi.nii.gz")
    assert grid.shape == ct.shape and grid.channels == 2
    with pytest.raises(MedistillError, match="stores 3D channels"):
        write_channels([ct.array[..., 0]] * 2, ct.affine, tmp_path / "flat.nii.gz")


def test_scaled_int16_nifti_reads_as_exact_float32(tmp_path: Path, ct_pair: tuple[Image, Image]) -> None:
    """CTs are often stored int16 with scl_inter -1024: values come back exact, as float32 not float64."""
    ct = ct_pair[0]
    stored = np.round(ct.array + 1024).astype(np.int16)
    img = nib.Nifti1Image(stored, ct.affine)
    img.header.set_slope_inter(1.0, -1024.0)
    nib.save(img, str(tmp_path / "scaled.nii.gz"))
    back = read_image(tmp_path / "scaled.nii.gz")
    assert back.array.dtype == np.float32
    np.testing.assert_array_equal(back.array, stored.astype(np.float32) - 1024)


@pytest.mark.parametrize("suffix", [".nii.gz", ".mha", ".nrrd", ".png"])
def test_read_grid_matches_read_image_without_loading_voxels(
    tmp_path: Path, ct_pair: tuple[Image, Image], suffix: str
) -> None:
    image = ct_pair[1] if suffix != ".png" else Image(ct_pair[1].array[:, :, 0], np.diag([0.5, 0.4, 1, 1]))
    write_image(image, tmp_path / f"x{suffix}")
    grid = read_grid(tmp_path / f"x{suffix}")
    assert grid.shape == image.shape and grid.channels == 1
    np.testing.assert_allclose(grid.affine, read_image(tmp_path / f"x{suffix}").affine, atol=1e-6)


# ---------------------------------------------------------------------------------------------- DICOM


def test_dicom_series_gives_hu_and_the_ras_affine_of_the_same_nifti(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    stored = rng.integers(0, 1500, size=(4, 6, 5)).astype(np.int16)  # (slices, rows, cols)
    affine = write_ct_series(tmp_path / "series", stored)
    hu = stored.astype(np.float32) * 2 - 1024
    expected = Image(hu.transpose(2, 1, 0), affine)  # (cols, rows, slices) = NIfTI (x, y, z)
    write_image(expected, tmp_path / "expected.nii.gz")

    image = read_image(tmp_path / "series")
    reference = read_image(tmp_path / "expected.nii.gz")
    assert image.array.dtype == np.float32
    assert image.shape == (5, 6, 4)
    np.testing.assert_array_equal(image.array, reference.array)
    np.testing.assert_allclose(image.affine, reference.affine, atol=1e-3)
    assert image.spacing == pytest.approx((0.9, 0.7, 2.5), abs=1e-4)
    check_same_grid(image, reference, "series", "expected.nii.gz")


def test_folder_with_two_series_is_refused_with_both_listed(tmp_path: Path) -> None:
    stored = np.zeros((2, 3, 3), np.int16)
    write_ct_series(tmp_path / "one", stored)
    write_ct_series(tmp_path / "two", stored)
    for f in (tmp_path / "two").iterdir():
        f.rename(tmp_path / "one" / f"other_{f.name}")
    with pytest.raises(MedistillError, match=r"one: folder holds 2 DICOM series \(.*2 files\), .*2 files\)"):
        read_image(tmp_path / "one")
    with pytest.raises(MedistillError, match="folder holds no DICOM series"):
        read_image(tmp_path / "two")


def test_single_dicom_slice_is_rows_by_columns_with_patient_geometry(tmp_path: Path) -> None:
    stored = np.arange(30, dtype=np.int16).reshape(5, 6)
    affine = write_ct_series(tmp_path / "series", stored[None], angle_deg=0.0)
    image = read_image(next((tmp_path / "series").iterdir()))
    assert image.shape == (5, 6)
    np.testing.assert_array_equal(image.array, stored * 2.0 - 1024)
    # column 0 steps down the rows (RAS: +y row direction in LPS becomes -y), column 1 along a row
    np.testing.assert_allclose(image.affine[:3, 0], affine[:3, 1], atol=1e-6)
    np.testing.assert_allclose(image.affine[:3, 1], affine[:3, 0], atol=1e-6)
    np.testing.assert_allclose(image.affine[:3, 3], affine[:3, 3], atol=1e-3)
    assert image.spacing == pytest.approx((0.7, 0.9))


def test_radiograph_monochrome1_is_inverted_so_bone_is_high(tmp_path: Path) -> None:
    pixels = np.array([[0, 100], [1000, 4095]], np.uint16)
    common = {
        "SOPClassUID": CR_STORAGE,
        "Modality": "CR",
        "BitsStored": 12,
        "ImagerPixelSpacing": [0.15, 0.2],
    }
    m2 = write_dicom(tmp_path / "m2.dcm", pixels, PhotometricInterpretation="MONOCHROME2", **common)
    m1 = write_dicom(tmp_path / "m1.dcm", pixels, PhotometricInterpretation="MONOCHROME1", **common)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # spacing is present: no warning
        a, b = read_radiograph(m2), read_radiograph(m1)
    assert a.array.dtype == b.array.dtype == np.float32
    np.testing.assert_array_equal(a.array, pixels.astype(np.float32))
    np.testing.assert_array_equal(b.array, 4095.0 - pixels)  # inverted within the 12 stored bits
    assert b.spacing == pytest.approx((0.15, 0.2))


def test_radiograph_without_spacing_warns_and_assumes_1mm(tmp_path: Path) -> None:
    path = write_dicom(
        tmp_path / "nospacing.dcm",
        np.ones((3, 3), np.uint16),
        SOPClassUID=CR_STORAGE,
        Modality="CR",
        PixelSpacing=["0", "0"],  # as in a real CR (RG1): zero means unknown
    )
    with pytest.warns(UserWarning, match=r"nospacing\.dcm.*assuming 1\.0 mm"):
        image = read_radiograph(path)
    assert image.spacing == (1.0, 1.0)


# ------------------------------------------------------------------------------------------ bad input


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(MedistillError, match=r"nothere\.nii\.gz: file not found"):
        read_image(tmp_path / "nothere.nii.gz")


def test_truncated_nifti(tmp_path: Path, ct_files: tuple[Path, Path]) -> None:
    ct, _ = ct_files
    raw = gzip.decompress(ct.read_bytes())
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(gzip.compress(raw[: len(raw) // 2])[:-20])
    with pytest.raises(MedistillError, match=r"cut\.nii\.gz"):
        read_image(cut)


def test_garbage_named_dcm(tmp_path: Path) -> None:
    bad = tmp_path / "garbage.dcm"
    bad.write_bytes(b"\x00\x17not a dicom file at all" * 10)
    with pytest.raises(MedistillError, match=r"garbage\.dcm: not a readable DICOM"):
        read_image(bad)


def test_dicom_without_pixel_data(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "empty.dcm", None, Modality="CT")
    with pytest.raises(MedistillError, match=r"empty\.dcm: DICOM file has no pixel data"):
        read_image(path)


@pytest.mark.parametrize(
    ("tags", "kind"),
    [
        ({"SOPClassUID": SEG_STORAGE, "Modality": "SEG"}, "Segmentation"),
        ({"Modality": "RTSTRUCT"}, "RTSTRUCT"),
    ],
)
def test_dicom_of_the_wrong_kind(tmp_path: Path, tags: dict[str, str], kind: str) -> None:
    path = write_dicom(tmp_path / "obj.dcm", np.zeros((2, 2), np.uint16), **tags)
    with pytest.raises(MedistillError, match=rf"obj\.dcm: DICOM .*{kind}.*not an image"):
        read_image(path)


def test_unsupported_extension(tmp_path: Path) -> None:
    path = tmp_path / "scan.jpg2"
    path.write_bytes(b"x")
    with pytest.raises(MedistillError, match=r"scan\.jpg2: unsupported image format"):
        read_image(path)
    with pytest.raises(MedistillError, match="cannot write format"):
        write_image(Image(np.zeros((2, 2)), np.eye(4)), tmp_path / "out.dcm")


def test_check_same_grid_names_both_and_the_difference(ct_pair: tuple[Image, Image]) -> None:
    ct, label = ct_pair
    check_same_grid(ct, label, "ct.nii.gz", "label.nii.gz")
    moved = label.affine.copy()
    moved[0, 3] += 1.0
    shifted = Image(label.array, moved)
    with pytest.raises(MedistillError, match=r"ct\.nii\.gz and label\.nii\.gz .*origin"):
        check_same_grid(ct, shifted, "ct.nii.gz", "label.nii.gz")
    coarse = Image(label.array[::2], label.affine @ np.diag([2.0, 1, 1, 1]))
    with pytest.raises(MedistillError, match=r"shape \(12, 10, 8\) vs \(6, 10, 8\); spacing"):
        check_same_grid(ct, coarse, "ct", "label")


def test_pydicom_reads_our_synthetic_files(tmp_path: Path) -> None:
    """Guard for the helper above: the synthetic files are proper DICOM, not something only we accept."""
    path = write_dicom(tmp_path / "x.dcm", np.zeros((2, 3), np.int16), Modality="CT")
    ds = pydicom.dcmread(path)
    assert ds.pixel_array.shape == (2, 3) and ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
