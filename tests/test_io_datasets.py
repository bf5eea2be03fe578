"""Dataset layouts load into cases, and validate() catches each broken case by id and file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import make_ct
from medistill.cli import app
from medistill.cli import data as _data_verbs  # noqa: F401  (registers the `data` commands)
from medistill.errors import MedistillError
from medistill.io.datasets import (
    load_dataset,
    load_msd,
    load_nnunet_raw,
    load_paired_folder,
    load_unpaired_folders,
    validate,
    write_msd,
)
from medistill.io.images import Image, read_channels, read_image, write_image

LABELS = {"background": 0, "body": 1, "bone": 2}


def cohort(n: int) -> list[tuple[str, Image, Image]]:
    return [(f"case{i:02d}", *make_ct(seed=i)) for i in range(n)]


@pytest.fixture
def msd(tmp_path: Path) -> Path:
    ct, _ = make_ct(seed=9)
    write_msd(tmp_path / "Task01", cohort(3), LABELS, name="toy", test_cases=[("t00", ct)])
    return tmp_path / "Task01" / "dataset.json"


def test_write_msd_then_load_msd(msd: Path) -> None:
    raw = json.loads(msd.read_text())
    assert raw["labels"] == {"0": "background", "1": "body", "2": "bone"}  # MSD direction: id -> name
    assert raw["modality"] == {"0": "CT"} and raw["numTraining"] == 3
    ds = load_msd(msd)
    assert ds.name == "toy" and ds.layout == "msd"
    assert [c.id for c in ds.cases] == ["case00", "case01", "case02"]
    assert [c.id for c in ds.test_cases] == ["t00"] and ds.test_cases[0].label is None
    assert ds.labels == LABELS and ds.label_names[2] == "bone"
    assert ds.channel_names == ["CT"] and ds.file_ending == ".nii.gz"
    validate(ds)
    # what was written is what the cohort held, voxel for voxel
    ct, label = make_ct(seed=1)
    back = read_image(ds.cases[1].label)  # type: ignore[arg-type]
    assert back.array.dtype == np.uint8
    np.testing.assert_array_equal(back.array, label.array)
    np.testing.assert_allclose(read_image(ds.cases[1].images[0]).array, ct.array)


def test_msd_labels_accepted_in_either_direction(msd: Path) -> None:
    raw = json.loads(msd.read_text())
    raw["labels"] = {"background": 0, "bone": 2, "body": 1}  # nnU-Net v2 style
    msd.write_text(json.dumps(raw))
    assert load_msd(msd).labels == LABELS


def test_write_msd_refuses_overwrite_and_undeclared_labels(msd: Path, tmp_path: Path) -> None:
    with pytest.raises(MedistillError, match="already holds a dataset.json"):
        write_msd(msd.parent, cohort(1), LABELS)
    with pytest.raises(MedistillError, match=r"case 'case00': label holds values \[2\] not declared"):
        write_msd(tmp_path / "bad", cohort(1), {"background": 0, "body": 1})


def test_multichannel_msd_is_one_4d_file_per_case(tmp_path: Path) -> None:
    cases = [(cid, [ct, ct.with_array(ct.array * 0.5)], label) for cid, ct, label in cohort(2)]
    ds = write_msd(tmp_path / "mm", cases, LABELS, channel_names=["CT", "CT-half"])
    assert ds.channel_names == ["CT", "CT-half"]
    channels = read_channels(ds.cases[0].images[0])
    np.testing.assert_allclose(channels[1].array, channels[0].array * 0.5)
    validate(ds)


def test_validate_names_case_and_file_for_each_problem(msd: Path) -> None:
    ds = load_msd(msd)
    ds.cases[0].label.unlink()  # type: ignore[union-attr]
    label = read_image(ds.cases[1].label)  # type: ignore[arg-type]
    label.array[0, 0, 0] = 7
    write_image(label, ds.cases[1].label)  # type: ignore[arg-type]
    shifted = label.affine.copy()
    shifted[2, 3] += 5.0
    write_image(Image(np.zeros_like(label.array), shifted), ds.cases[2].label)  # type: ignore[arg-type]
    with pytest.raises(MedistillError) as info:
        validate(ds)
    message = str(info.value)
    assert "3 problem(s)" in message
    assert "case 'case00': missing file" in message and "labelsTr/case00.nii.gz" in message
    assert "case 'case01': label" in message and "values [7] not declared" in message
    assert "case 'case02': image case02.nii.gz and label case02.nii.gz are not on the same grid" in message
    assert "origin" in message
    ds.cases = [ds.cases[1]]
    validate(ds, check_labels=False)  # the stray value is case01's only problem


def make_nnunet(root: Path, n_cases: int = 2) -> Path:
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (root / sub).mkdir(parents=True)
    for i in range(n_cases):
        ct, label = make_ct(seed=i)
        write_image(ct, root / "imagesTr" / f"pt{i}_0000.nii.gz")
        write_image(ct.with_array(ct.array + 1), root / "imagesTr" / f"pt{i}_0001.nii.gz")
        write_image(label, root / "labelsTr" / f"pt{i}.nii.gz")
    write_image(ct, root / "imagesTs" / "new_0000.nii.gz")
    write_image(ct, root / "imagesTs" / "new_0001.nii.gz")
    meta = {
        "channel_names": {"0": "CT", "1": "CT+1"},
        "labels": LABELS,
        "numTraining": n_cases,
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_nnunet_raw_groups_channels_by_case(tmp_path: Path) -> None:
    ds = load_nnunet_raw(make_nnunet(tmp_path / "Dataset001_Toy"))
    assert ds.layout == "nnunet" and ds.name == "Dataset001_Toy"
    assert [c.id for c in ds.cases] == ["pt0", "pt1"]
    assert [p.name for p in ds.cases[1].images] == ["pt1_0000.nii.gz", "pt1_0001.nii.gz"]
    assert ds.cases[1].label == tmp_path / "Dataset001_Toy" / "labelsTr" / "pt1.nii.gz"
    assert [c.id for c in ds.test_cases] == ["new"]
    assert ds.channel_names == ["CT", "CT+1"] and ds.labels == LABELS
    validate(ds)


def test_nnunet_missing_channel_and_count_mismatch(tmp_path: Path) -> None:
    root = make_nnunet(tmp_path / "Dataset002_Toy")
    (root / "imagesTr" / "pt1_0001.nii.gz").unlink()
    with pytest.raises(MedistillError, match=r"case 'pt1': missing file .*pt1_0001\.nii\.gz"):
        validate(load_nnunet_raw(root))
    (root / "labelsTr" / "pt1.nii.gz").unlink()
    for f in (root / "imagesTr").glob("pt1_*"):
        f.unlink()
    with pytest.raises(MedistillError, match=r"numTraining is 2 but 1 cases were found"):
        load_nnunet_raw(root)


def test_msd_json_errors_name_the_file_and_field(tmp_path: Path) -> None:
    path = tmp_path / "dataset.json"
    path.write_text("{not json")
    with pytest.raises(MedistillError, match=r"dataset\.json: not valid JSON"):
        load_msd(path)
    path.write_text(json.dumps({"labels": {"0": "background"}}))
    with pytest.raises(MedistillError, match=r"dataset\.json: field 'training'"):
        load_msd(path)
    with pytest.raises(MedistillError, match="file not found"):
        load_msd(tmp_path / "nope" / "dataset.json")


def write_png(path: Path, array: np.ndarray) -> None:
    write_image(Image(array, np.eye(4)), path)


def test_paired_folders_match_by_name_and_check_targets(tmp_path: Path) -> None:
    a, b = tmp_path / "drr", tmp_path / "mask"
    for name in ("p1", "p2"):
        write_png(a / f"{name}.png", np.full((6, 5), 100, np.uint8))
        write_image(Image(np.ones((6, 5), np.uint8), np.eye(4)), b / f"{name}.nii.gz")
    ds = load_paired_folder(a, b, labels={"background": 0, "bone": 1})
    assert [(c.id, c.images[0].name, c.label.name) for c in ds.cases] == [  # type: ignore[union-attr]
        ("p1", "p1.png", "p1.nii.gz"),
        ("p2", "p2.png", "p2.nii.gz"),
    ]
    validate(ds)
    write_image(Image(np.full((6, 4), 3, np.uint8), np.eye(4)), b / "p2.nii.gz")
    with pytest.raises(MedistillError, match=r"case 'p2'.*shape \(6, 5\) vs \(6, 4\).*values \[3\]"):
        validate(ds)
    write_png(a / "p3.png", np.zeros((6, 5), np.uint8))
    with pytest.raises(MedistillError, match=r"1 only in .*drr \(e\.g\. p3\)"):
        load_paired_folder(a, b)


def test_unpaired_folders_list_each_domain(tmp_path: Path) -> None:
    for i in range(3):
        write_png(tmp_path / "mr" / f"mr{i}.png", np.zeros((4, 4), np.uint8))
    write_png(tmp_path / "ct" / "ct0.png", np.zeros((8, 8), np.uint8))
    ds = load_unpaired_folders(tmp_path / "mr", tmp_path / "ct")
    assert [c.id for c in ds.a] == ["mr0", "mr1", "mr2"] and [c.id for c in ds.b] == ["ct0"]
    validate(ds)
    (tmp_path / "mr" / "mr1.png").write_bytes(b"broken")
    with pytest.raises(MedistillError, match=r"case 'mr1': .*mr1\.png: not a readable PNG"):
        validate(ds)
    with pytest.raises(MedistillError, match=r"empty: folder not found"):
        load_unpaired_folders(tmp_path / "mr", tmp_path / "empty")


def test_load_dataset_tells_msd_from_nnunet(msd: Path, tmp_path: Path) -> None:
    assert load_dataset(msd.parent).layout == "msd"
    assert load_dataset(make_nnunet(tmp_path / "Dataset003_Toy")).layout == "nnunet"
    (tmp_path / "other.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(MedistillError, match=r"other\.json: neither an MSD"):
        load_dataset(tmp_path / "other.json")


def test_cli_data_check(msd: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["data", "check", str(msd.parent)])
    assert ok.exit_code == 0, ok.output
    assert "ok: toy (msd): 3 training and 1 test cases" in ok.stdout and "2=bone" in ok.stdout
    (msd.parent / "labelsTr" / "case01.nii.gz").unlink()
    bad = runner.invoke(app, ["data", "check", str(msd)])
    assert isinstance(bad.exception, MedistillError) and "case 'case01': missing file" in str(bad.exception)
