"""``medistill simulate metal`` / ``report metal``: shards + index, resumable, seeded; bad input fails."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from example_data import require_example
from medistill.cli import main
from medistill.io.images import Image, write_image
from medistill.physics import ct

SIZE = 48


@pytest.fixture(autouse=True)
def tiny_preset(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 48 px fan-beam preset so each slice simulates in well under a second."""
    sod_px = 2.6 * SIZE

    def tiny() -> ct.CTGeometry:
        return ct.CTGeometry(
            SIZE, 1.0, 64, 71, ct._fan_arc_spacing(SIZE, sod_px, 71), beam="fan", detector="arc",
            sod_mm=sod_px, sdd_mm=2 * sod_px,
        )  # fmt: skip

    monkeypatch.setitem(ct.PRESETS, "tiny", tiny)


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


def _volume(
    path: Path, shape: tuple[int, int, int] = (96, 96, 3), spacing: tuple[float, ...] = (0.8, 0.8, 2.5)
) -> Path:
    x, y = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape[:2]], indexing="ij")
    hu = np.full(shape, -1000.0, np.float32)
    hu[(x**2 + y**2) < 0.8**2] = 30.0
    hu[((x - 0.3) ** 2 + y**2) < 0.15**2] = 900.0  # a bone
    write_image(Image(hu, np.diag([*spacing, 1.0])), path)
    return path


def _arrays(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for shard in sorted(folder.glob("slice_*.npz")):
        with np.load(shard) as data:
            out |= {f"{shard.stem}/{k}": data[k] for k in data.files}
    return out


def test_simulate_metal_writes_seeded_resumable_shards(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ct_path = _volume(tmp_path / "ct.nii.gz")
    args = [
        "simulate",
        "metal",
        str(ct_path),
        "--geometry",
        "tiny",
        "--slices",
        "0:2",
        "--masks-per-slice",
        "2",
    ]
    code, err = run_cli([*args, "--out", str(tmp_path / "a"), "--seed", "3", "--baselines"], capsys)
    assert code == 0, err
    with open(tmp_path / "a" / "index.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["slice"], r["mask"]) for r in rows] == [("0", "0"), ("0", "1"), ("1", "0"), ("1", "1")]
    for r in rows:
        assert int(r["metal_px"]) > 0
        assert float(r["rmse_artifact_hu"]) > float(r["rmse_li_hu"]) > 0  # streaks, reduced by LI
    arrays = _arrays(tmp_path / "a")
    assert arrays["slice_00000/artifact_hu"].shape == (2, SIZE, SIZE)
    assert arrays["slice_00000/sino_metal"].shape == (2, 64, 71)
    assert {"li_hu", "nmar_hu", "metal_trace", "sino_clean", "free_hu"} <= {k.split("/")[1] for k in arrays}
    # resumable: a deleted shard is redone identically, the others are kept; same seed -> same numbers
    (tmp_path / "a" / "slice_00001.npz").unlink()
    assert run_cli([*args, "--out", str(tmp_path / "a"), "--seed", "3", "--baselines"], capsys)[0] == 0
    again = _arrays(tmp_path / "a")
    assert all(np.array_equal(arrays[k], again[k]) for k in arrays)
    # another seed, other masks
    assert run_cli([*args, "--out", str(tmp_path / "b"), "--seed", "4"], capsys)[0] == 0
    other = _arrays(tmp_path / "b")
    assert not np.array_equal(other["slice_00000/metal_mask"], arrays["slice_00000/metal_mask"])
    # a folder holding other settings is refused
    code, err = run_cli([*args, "--out", str(tmp_path / "a"), "--seed", "9"], capsys)
    assert code == 2 and "other settings" in err
    # the figure
    code, err = run_cli(["report", "metal", str(tmp_path / "a"), "--samples", "2"], capsys)
    assert code == 0, err
    assert (tmp_path / "a" / "metal_samples.png").stat().st_size > 10_000


def _reoriented(image: Image, axcodes: tuple[str, str, str]) -> Image:
    """The same CT stored in another axis order / direction (``axcodes`` as nibabel spells them)."""
    start = nib.orientations.io_orientation(image.affine)
    change = nib.orientations.ornt_transform(start, nib.orientations.axcodes2ornt(axcodes))
    array = nib.orientations.apply_orientation(image.array, change)
    return Image(array, image.affine @ nib.orientations.inv_ornt_aff(change, image.shape))


def test_every_storage_order_of_one_ct_gives_the_same_slices(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """RAS, LAS (flipped x), PRS (x/y swapped, y reversed), ILP (z first): the affine decides the slices."""
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in (96, 96, 3)], indexing="ij")
    hu = np.full(x.shape, -1000.0, np.float32)
    hu[(x**2 + y**2) < 0.8**2] = 30.0
    hu[((x - 0.3) ** 2 + y**2) < 0.15**2] = 900.0  # bone on the patient's right (+x in RAS)
    hu[((x + 0.1) ** 2 + (y - 0.5) ** 2) < 0.1**2] = 300.0  # anterior-left marker: breaks every symmetry
    hu += 50.0 * z  # slices differ: superior brighter
    ras = Image(hu, np.diag([0.8, 0.8, 2.5, 1.0]))
    results = {}
    for codes in (("R", "A", "S"), ("L", "A", "S"), ("P", "R", "S"), ("I", "L", "P")):
        name = "".join(codes)
        image = _reoriented(ras, codes)
        assert image.shape == ((96, 96, 3) if name != "ILP" else (3, 96, 96))
        write_image(image, tmp_path / f"{name}.nii.gz")
        args = ["simulate", "metal", str(tmp_path / f"{name}.nii.gz"), "--geometry", "tiny", "--slices"]
        assert run_cli([*args, "1:3", "--out", str(tmp_path / name)], capsys)[0] == 0
        results[name] = _arrays(tmp_path / name)
    ras_out = results.pop("RAS")
    for name, arrays in results.items():
        assert arrays.keys() == ras_out.keys()
        assert all(np.array_equal(arrays[k], ras_out[k]) for k in ras_out), name
    # radiological view of RAS slice k: row r = anterior -> posterior (y reversed), column c = right -> left
    # (x reversed), i.e. hu[::-1, ::-1, k].T, here 2x2-averaged from 96 to 48 px
    for k in (1, 2):
        view = hu[::-1, ::-1, k].T.reshape(SIZE, 2, SIZE, 2).mean((1, 3))
        np.testing.assert_allclose(ras_out[f"slice_{k:05d}/clean_hu"][0], view, atol=1e-3)
    clean = ras_out["slice_00001/clean_hu"][0]
    assert np.nonzero(clean > 600)[1].mean() < SIZE / 2  # the patient's right (the bone) on the image's left


def test_single_dicom_slice(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dcm = require_example("radiographs") / "693_UNCR.dcm"
    code, err = run_cli(["simulate", "metal", str(dcm), "--geometry", "tiny", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    with open(tmp_path / "index.csv") as f:
        assert len(list(csv.DictReader(f))) == 1


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--photons", "0"], "photon count must be > 0"),
        (["--geometry", "deeplesion"], "unknown CT geometry preset"),
        (["--metal", "lead"], "unknown metal"),
        (["--kvp", "300"], "kVp"),
        (["--slices", "7:9"], "selects no slice"),
        (["--mask-file", "{tmp}/corner.nii.gz"], "outside the field of view"),
    ],
)
def test_bad_input_fails_before_work(
    extra: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ct_path = _volume(tmp_path / "ct.nii.gz")
    corner = np.zeros((SIZE, SIZE), np.float32)
    corner[0, 0] = 1
    write_image(Image(corner[..., None], np.eye(4)), tmp_path / "corner.nii.gz")
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    code, err = run_cli(
        ["simulate", "metal", str(ct_path), "--geometry", "tiny", "--out", str(tmp_path / "o"), *extra],
        capsys,
    )
    assert code == 2 and message in err, err
    assert not list((tmp_path / "o").glob("*.npz")) if (tmp_path / "o").exists() else True


@pytest.mark.parametrize(
    ("shape", "spacing", "message"),
    [
        ((96, 80, 2), (0.8, 0.8, 2.5), "must be square"),
        ((96, 96, 2), (0.8, 0.5, 2.5), "spacing must be square"),
    ],
)
def test_bad_slices(shape: tuple[int, int, int], spacing: tuple[float, ...], message: str, tmp_path: Path,
                    capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    ct_path = _volume(tmp_path / "ct.nii.gz", shape, spacing)
    code, err = run_cli(
        ["simulate", "metal", str(ct_path), "--geometry", "tiny", "--out", str(tmp_path / "o")], capsys
    )
    assert code == 2 and message in err, err
