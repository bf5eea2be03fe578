"""The chest-ct-2, head-ct and head-mr example sets: geometry, labels and anatomy as documented, and the
fetch machinery for Debian packages (apt-get download, .deb reading, stale lists, no apt, files placed
by hand) exercised offline with a fake apt and small .deb files built here.

Real-data tests read the cache (``medistill data fetch chest-ct-2 head-ct head-mr``); without it they
skip, or fail when ``CI`` is set (see ``example_data.require_example``).
"""

from __future__ import annotations

import hashlib
import io
import plistlib
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import NamedTuple

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from example_data import require_example
from medistill.cli import app
from medistill.cli import data as _data_verbs  # noqa: F401  (registers the `data` commands)
from medistill.errors import MedistillError
from medistill.io import example_formats, examples
from medistill.io.images import Image, read_image


def centroid_mm(image: Image, mask: np.ndarray) -> np.ndarray:
    """World (RAS mm) centroid of the voxels in ``mask``."""
    ijk = np.argwhere(mask).mean(axis=0)
    return image.affine[:3, :3] @ ijk + image.affine[:3, 3]


# ------------------------------------------------------------------------------------------ chest-ct-2


@pytest.fixture(scope="module")
def chest2() -> tuple[Image, Image, dict[str, int]]:
    return example_formats.load_chest_ct_2(require_example("chest-ct-2"))


def test_chest_ct_2_grid_labels_and_hu(chest2: tuple[Image, Image, dict[str, int]]) -> None:
    ct, labels, names = chest2
    assert ct.shape == labels.shape == (128, 128, 34)
    assert ct.spacing == pytest.approx((3.046876, 3.046876, 10.0), abs=1e-5)
    assert np.array_equal(ct.affine, labels.affine)
    assert names == {
        "ribs": 1,
        "cervical vertebral column": 2,
        "thoracic vertebral column": 3,
        "lumbar vertebral column": 4,
        "right lung": 5,
        "left lung": 6,
        "tissue": 7,
    }
    assert set(np.unique(labels.array).tolist()) == {0, *names.values()}  # every segment is drawn
    hu, lab = ct.array, labels.array
    assert hu.min() == -3024  # outside the scan field of view
    assert np.median(hu[(lab == 0) & (hu > -2000)]) < -900  # air around the body
    for lung in ("right lung", "left lung"):
        assert -950 < np.median(hu[lab == names[lung]]) < -750
    for bone in ("ribs", "thoracic vertebral column", "lumbar vertebral column"):
        assert np.median(hu[lab == names[bone]]) > 150
    assert -100 < np.median(hu[lab == names["tissue"]]) < 100


def test_chest_ct_2_anatomy_is_ras(chest2: tuple[Image, Image, dict[str, int]]) -> None:
    """LPS NRRD -> RAS: the right lung lies at +x, the spine behind the lungs, the neck above the loins."""
    ct, labels, names = chest2
    at = {name: centroid_mm(ct, labels.array == value) for name, value in names.items()}
    assert at["right lung"][0] - at["left lung"][0] > 100  # lungs' centres are ~14 cm apart
    assert at["thoracic vertebral column"][1] < min(at["right lung"][1], at["left lung"][1]) - 40
    z = [at[f"{part} vertebral column"][2] for part in ("cervical", "thoracic", "lumbar")]
    assert z[0] > z[1] > z[2]


# ------------------------------------------------------------------------------------------ head-ct


@pytest.fixture(scope="module")
def head_ct() -> example_formats.HeadCT:
    return example_formats.load_head_ct(require_example("head-ct") / "Cranium.inv3")


def test_head_ct_geometry_and_hu(head_ct: example_formats.HeadCT) -> None:
    image = head_ct.image
    assert image.shape == head_ct.bone.shape == head_ct.soft_tissue.shape == (256, 256, 108)
    assert image.spacing == pytest.approx((0.9570312, 0.9570312, 1.5))
    assert nib.aff2axcodes(image.affine) == ("L", "A", "S")
    hu = image.array
    assert hu.min() == -1024 and 2900 < hu.max() < 3000  # enamel, no metal
    assert np.median(hu[:20, :20, :]) == pytest.approx(-1000, abs=30)  # air in the corners
    assert np.median(hu[head_ct.bone]) > 400


def test_head_ct_masks_are_the_recorded_thresholds(head_ct: example_formats.HeadCT) -> None:
    """InVesalius' bone mask is HU >= 226 and its soft-tissue mask HU >= -142 (their plists say so), once the
    extra first plane is dropped: a one-voxel shift would break the equality at every edge."""
    hu, bone = head_ct.image.array, head_ct.bone
    assert np.array_equal(bone, hu >= 226)
    assert np.array_equal(head_ct.soft_tissue, (hu >= -142) & (hu <= 2986))
    assert (hu[bone] > 200).all() and bone[hu > 200].mean() > 0.95  # "bone = HU > ~200" for most voxels


def test_head_ct_orientation_matches_the_anatomy(head_ct: example_formats.HeadCT) -> None:
    """Teeth (enamel > 2000 HU) are anterior and inferior of the skull's centre; the head narrows to the
    vertex at the top slices (superior = +z) while the lowest slice still cuts through the jaw."""
    image, hu = head_ct.image, head_ct.image.array
    teeth, skull = centroid_mm(image, hu > 2000), centroid_mm(image, head_ct.bone)
    assert teeth[1] - skull[1] > 50  # anterior is +y
    assert teeth[2] - skull[2] < -50  # the teeth are low
    assert abs(teeth[0] - skull[0]) < 15  # the dental arch is central
    area = (hu > -300).sum(axis=(0, 1))
    assert area[-2:].max() < 0.1 * area.max() < area[0]


def test_head_ct_nifti_in_the_cache_is_the_loaded_volume(head_ct: example_formats.HeadCT) -> None:
    folder = require_example("head-ct")
    ct = read_image(folder / "head_ct.nii.gz")
    bone = read_image(folder / "head_ct_bone.nii.gz")
    np.testing.assert_allclose(ct.affine, head_ct.image.affine, atol=1e-5)
    assert np.array_equal(ct.array, head_ct.image.array)
    assert np.array_equal(bone.array.astype(bool), head_ct.bone)


# ------------------------------------------------------------------------------------------ head-mr


def test_head_mr_t1_and_aal_share_a_grid_and_the_names() -> None:
    t1, aal, names = example_formats.load_head_mr(require_example("head-mr"))
    assert t1.shape == aal.shape == (181, 217, 181)
    assert t1.spacing == pytest.approx((1.0, 1.0, 1.0))
    assert nib.aff2axcodes(t1.affine) == ("R", "A", "S")
    assert len(names) == 116 and sorted(names.values()) == list(range(1, 117))
    assert set(np.unique(aal.array).tolist()) == set(range(117))
    # AAL's _L regions are on the left (-x in RAS), frontal in front of occipital
    assert centroid_mm(aal, aal.array == names["Precentral_L"])[0] < -20
    assert centroid_mm(aal, aal.array == names["Precentral_R"])[0] > 20
    front = centroid_mm(aal, aal.array == names["Frontal_Sup_L"])
    assert front[1] - centroid_mm(aal, aal.array == names["Occipital_Sup_L"])[1] > 80


def test_head_mr_keeps_skull_and_scalp() -> None:
    """Unlike the MNI152 brain template, Colin27 here is a whole head: signal reaches past the brain on all
    sides (scalp and skull), and the air outside is zero."""
    t1, aal, _ = example_formats.load_head_mr(require_example("head-mr"))
    head = np.argwhere(t1.array > 20)
    brain = np.argwhere(aal.array > 0)
    assert (head.min(axis=0) < brain.min(axis=0) - 8).all()
    assert (head.max(axis=0)[:2] > brain.max(axis=0)[:2] + 8).all()  # below the brain: the neck, cropped
    assert t1.array[:5, :5, :5].max() == 0


# ---------------------------------------------------------------------------------- .deb fetches, offline

PAYLOAD = b"pretend this is a NIfTI volume\n" * 200
MEMBER = "usr/share/fakepkg/vol.nii.gz"


def _tar(files: dict[str, bytes], mode: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _ar(members: dict[str, bytes]) -> bytes:
    """A Unix ``ar`` archive as ``dpkg-deb`` writes it (60-byte headers, even-length padding)."""
    out = [b"!<arch>\n"]
    for name, data in members.items():
        out.append(f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode())
        out.append(data + (b"\n" if len(data) % 2 else b""))
    return b"".join(out)


def make_deb(path: Path, files: dict[str, bytes], compression: str = "xz") -> Path:
    """A minimal .deb: debian-binary, control.tar.xz, data.tar.<compression> with ``./``-prefixed paths."""
    data = {f"./{name}": content for name, content in files.items()}
    if compression == "zst":
        raw = _tar(data, "w")
        packed = subprocess.run(["zstd", "-q", "-c"], input=raw, capture_output=True, check=True).stdout
    else:
        packed = _tar(data, f"w:{compression}" if compression else "w")
    control = _tar({"./control": b"Package: fakepkg\nVersion: 1.0-1\nArchitecture: all\n"}, "w:xz")
    suffix = f".{compression}" if compression else ""
    path.write_bytes(_ar({"debian-binary": b"2.0\n", "control.tar.xz": control, f"data.tar{suffix}": packed}))
    return path


class FakeApt(NamedTuple):
    calls: list[list[str]]  # apt-get arguments, in order
    cache: Path
    lists: dict[str, bool]  # {"fresh": False} makes apt-get not know the package until an update


@pytest.fixture
def fake_apt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeApt:
    """A Debian-sourced fake set, and an apt-get stand-in whose package lists know it from the start."""
    deb = make_deb(
        tmp_path / "fakepkg_1.0-1_all.deb", {MEMBER: PAYLOAD, "usr/share/doc/fakepkg/x": b"unlisted"}
    )
    digest = hashlib.sha256(PAYLOAD).hexdigest()
    spec = examples._set("fake-deb", "fakepkg", "1.0-1", "MIT", "test", {MEMBER: digest}, source="debian")
    monkeypatch.setitem(examples.EXAMPLES, "fake-deb", spec)
    monkeypatch.setenv("MEDISTILL_DATA", str(tmp_path / "cache"))
    monkeypatch.setattr(examples, "_apt_get", lambda: "/usr/bin/apt-get")
    calls: list[list[str]] = []
    lists = {"fresh": True}

    def run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        calls.append(cmd[1:])
        if cmd[1] == "update":
            lists["fresh"] = True
            return subprocess.CompletedProcess(cmd, 0, "", "")
        assert cmd[1:] == ["download", "fakepkg=1.0-1"] and cwd is not None
        if not lists["fresh"]:
            return subprocess.CompletedProcess(cmd, 100, "", "E: Unable to locate package fakepkg\n")
        shutil.copy(deb, cwd)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(examples, "_run", run)
    monkeypatch.setattr(examples, "_is_root", lambda: True)
    return FakeApt(calls, tmp_path / "cache", lists)


def test_apt_fetch_extracts_only_the_listed_member_once(fake_apt: FakeApt) -> None:
    folder = examples.fetch("fake-deb", quiet=True)
    assert sorted(p.name for p in folder.iterdir()) == ["vol.nii.gz"]  # no .deb, nothing unlisted
    assert (folder / "vol.nii.gz").read_bytes() == PAYLOAD
    assert examples.fetch("fake-deb", quiet=True) == folder
    assert fake_apt.calls == [["download", "fakepkg=1.0-1"]]  # the second fetch was a cache hit
    assert examples.EXAMPLES["fake-deb"].requirement == "fakepkg=1.0-1"


def test_stale_package_lists_are_updated_once_then_retried(fake_apt: FakeApt) -> None:
    fake_apt.lists["fresh"] = False
    examples.fetch("fake-deb", quiet=True)
    assert fake_apt.calls == [["download", "fakepkg=1.0-1"], ["update"], ["download", "fakepkg=1.0-1"]]
    assert (fake_apt.cache / "fake-deb" / "vol.nii.gz").read_bytes() == PAYLOAD


def test_stale_lists_without_root_say_what_to_run(fake_apt: FakeApt, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_apt.lists["fresh"] = False
    monkeypatch.setattr(examples, "_is_root", lambda: False)
    with pytest.raises(MedistillError) as info:
        examples.fetch("fake-deb", quiet=True)
    message = str(info.value)
    assert "\n" not in message and "sudo apt-get update" in message and "Unable to locate package" in message
    assert fake_apt.calls == [["download", "fakepkg=1.0-1"]]  # no update attempted without root


def test_without_apt_the_message_names_the_exact_cache_path_and_a_hand_placed_file_works(
    fake_apt: FakeApt, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(examples, "_apt_get", lambda: None)
    target = fake_apt.cache / "fake-deb" / "vol.nii.gz"
    with pytest.raises(MedistillError) as info:
        examples.fetch("fake-deb", quiet=True)
    message = str(info.value)
    assert "\n" not in message and "apt-get is not available" in message
    assert f"place {target} (sha256 {hashlib.sha256(PAYLOAD).hexdigest()})" in message
    assert "medistill data check fake-deb" in message and "apt-get download fakepkg=1.0-1" in message
    # the user puts a wrong file there first, then the right one
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(PAYLOAD[:-1])
    with pytest.raises(MedistillError, match=r"vol\.nii\.gz bad sha256"):
        examples.check("fake-deb")
    target.write_bytes(PAYLOAD)
    assert examples.check("fake-deb") == {"vol.nii.gz": "ok"}
    assert examples.fetch("fake-deb", quiet=True) == target.parent
    checked = CliRunner().invoke(app, ["data", "check", "fake-deb"])
    assert checked.exit_code == 0 and checked.stdout.strip() == f"ok: {target}"
    assert fake_apt.calls == []  # apt was never run


def test_deb_with_wrong_content_places_nothing(fake_apt: FakeApt, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = examples.EXAMPLES["fake-deb"]
    monkeypatch.setitem(
        examples.EXAMPLES,
        "fake-deb",
        examples.ExampleSet(**{**spec.__dict__, "sha256": {"vol.nii.gz": "0" * 64}}),
    )
    with pytest.raises(MedistillError, match=r"usr/share/fakepkg/vol\.nii\.gz has sha256 .* expected 0000"):
        examples.fetch("fake-deb", quiet=True)
    assert list((fake_apt.cache / "fake-deb").iterdir()) == []


@pytest.mark.parametrize("compression", ["xz", "gz", "bz2", "", "zst"])
def test_every_deb_data_compression_is_read(fake_apt: FakeApt, tmp_path: Path, compression: str) -> None:
    if compression == "zst" and not (shutil.which("zstd") and shutil.which("dpkg-deb")):
        pytest.skip("zstd data archives need the zstd and dpkg-deb programs")
    deb = make_deb(tmp_path / f"p-{compression}.deb", {MEMBER: PAYLOAD}, compression)
    folder = examples.fetch("fake-deb", quiet=True, package_file=deb)
    assert (folder / "vol.nii.gz").read_bytes() == PAYLOAD and fake_apt.calls == []


def test_a_deb_without_the_member_or_not_a_deb_is_refused(fake_apt: FakeApt, tmp_path: Path) -> None:
    other = make_deb(tmp_path / "other.deb", {"usr/share/other/file": b"x"})
    with pytest.raises(MedistillError, match=r"other\.deb: has no member usr/share/fakepkg/vol\.nii\.gz"):
        examples.fetch("fake-deb", quiet=True, package_file=other)
    (tmp_path / "junk.deb").write_bytes(b"PK\x03\x04 not an ar archive")
    with pytest.raises(MedistillError, match=r"junk\.deb: not a Debian package"):
        examples.fetch("fake-deb", quiet=True, package_file=tmp_path / "junk.deb")


def test_derived_files_are_made_once_and_rebuilt_offline(
    fake_apt: FakeApt, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[int] = []

    def derive(folder: Path) -> None:
        made.append(1)
        (folder / "copy.bin").write_bytes((folder / "vol.nii.gz").read_bytes()[::-1])

    spec = examples.EXAMPLES["fake-deb"]
    monkeypatch.setitem(
        examples.EXAMPLES,
        "fake-deb",
        examples.ExampleSet(**{**spec.__dict__, "derived": ("copy.bin",), "derive": derive}),
    )
    folder = examples.fetch("fake-deb", quiet=True)
    assert (folder / "copy.bin").read_bytes() == PAYLOAD[::-1] and len(made) == 1
    examples.fetch("fake-deb", quiet=True)
    assert len(made) == 1  # complete: nothing rebuilt
    (folder / "copy.bin").unlink()
    assert examples.file_status("fake-deb") == {"vol.nii.gz": "ok", "copy.bin": "missing"}
    examples.fetch("fake-deb", quiet=True)
    assert len(made) == 2 and len(fake_apt.calls) == 1  # rebuilt without downloading again
    assert examples.example_file("fake-deb", "copy.bin") == folder / "copy.bin"


# ------------------------------------------------------------------------------------------ format readers


def make_inv3(
    path: Path, volume_zyx: np.ndarray, spacing_xyz: tuple[float, float, float], masks: list
) -> Path:
    """An InVesalius project as InVesalius writes it: plists, raw C-order arrays, masks one plane larger
    on each axis with InVesalius' bookkeeping value 1 in the extra planes."""
    files = {}
    mask_plists = {}
    for k, mask in enumerate(masks):
        big = np.ones(tuple(s + 1 for s in volume_zyx.shape), np.uint8)
        big[1:, 1:, 1:] = np.where(mask, 255, 0)
        files[f"mask_{k}.dat"] = big.tobytes()
        files[f"mask_{k}.plist"] = plistlib.dumps(
            {"mask_file": f"mask_{k}.dat", "mask_shape": list(big.shape), "threshold_range": [k, 100 + k]}
        )
        mask_plists[str(k)] = f"mask_{k}.plist"
    main = {
        "matrix": {"dtype": "int16", "filename": "matrix.dat", "shape": list(volume_zyx.shape)},
        "spacing": list(spacing_xyz),
        "masks": mask_plists,
    }
    files["main.plist"] = plistlib.dumps(main)
    files["matrix.dat"] = volume_zyx.astype("<i2").tobytes()
    path.write_bytes(_tar({f"tmpdir/{n}": d for n, d in files.items()}, "w:gz"))
    return path


def test_inv3_axes_spacing_and_masks(tmp_path: Path) -> None:
    volume = np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5)  # (z, y, x)
    bone = volume > 40
    project = example_formats.read_inv3(
        make_inv3(tmp_path / "t.inv3", volume, (0.5, 0.6, 2.0), [bone, ~bone])
    )
    image = project.image
    assert image.shape == (5, 4, 3) and image.spacing == pytest.approx((0.5, 0.6, 2.0))
    assert image.array[4, 1, 2] == volume[2, 1, 4]  # array[x, y, z] = matrix[z, y, x]
    assert np.diag(image.affine)[:3] == pytest.approx((-0.5, 0.6, 2.0))  # L, A, S
    assert centroid_mm(image, np.ones(image.shape, bool)) == pytest.approx((0.0, 0.0, 0.0))
    assert np.array_equal(project.masks["mask_0"], image.array > 40)  # first planes dropped, 255 = inside
    assert np.array_equal(project.masks["mask_1"], image.array <= 40)
    assert project.thresholds == {"mask_0": (0.0, 100.0), "mask_1": (1.0, 101.0)}


def test_inv3_with_a_truncated_volume_or_odd_mask_is_refused(tmp_path: Path) -> None:
    volume = np.zeros((3, 4, 5), np.int16)
    path = make_inv3(tmp_path / "t.inv3", volume, (1.0, 1.0, 1.0), [])
    with tarfile.open(path) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    files["tmpdir/matrix.dat"] = files["tmpdir/matrix.dat"][:-2]
    path.write_bytes(_tar(files, "w:gz"))
    with pytest.raises(MedistillError, match=r"t\.inv3: matrix\.dat has 118 bytes, expected 120 for int16"):
        example_formats.read_inv3(path)
    (tmp_path / "x.inv3").write_bytes(b"not gzip")
    with pytest.raises(MedistillError, match=r"x\.inv3: not a readable InVesalius project"):
        example_formats.read_inv3(tmp_path / "x.inv3")


def test_segment_names_come_from_the_nrrd_header(tmp_path: Path) -> None:
    labels = sitk.GetImageFromArray(np.array([[[0, 1], [2, 7]]], np.uint8))
    for key, value in {"Segment0_Name": "ribs", "Segment0_LabelValue": "1", "Segment1_Name": "left lung",
                       "Segment1_LabelValue": "7"}.items():  # fmt: skip
        labels.SetMetaData(key, value)
    sitk.WriteImage(labels, str(tmp_path / "s.seg.nrrd"))
    image, names = example_formats.read_segmentation(tmp_path / "s.seg.nrrd")
    assert names == {"ribs": 1, "left lung": 7} and image.shape == (2, 2, 1)
    labels.EraseMetaData("Segment1_LabelValue")
    sitk.WriteImage(labels, str(tmp_path / "bad.seg.nrrd"))
    with pytest.raises(
        MedistillError, match=r"bad\.seg\.nrrd: header has Segment1_Name but no Segment1_LabelValue"
    ):
        example_formats.read_segment_names(tmp_path / "bad.seg.nrrd")


def test_label_table_lines(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("1 Precentral_L 2001\n2 Precentral_R 2002\n\n")
    assert example_formats.read_label_table(tmp_path / "t.txt") == {"Precentral_L": 1, "Precentral_R": 2}
    (tmp_path / "u.txt").write_text("Precentral_L 1\n")
    with pytest.raises(MedistillError, match=r"u\.txt: line 1 is 'Precentral_L 1'"):
        example_formats.read_label_table(tmp_path / "u.txt")
