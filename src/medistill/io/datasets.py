"""Dataset descriptions: which files make up each case, and what the labels mean.

Four layouts users already have on disk:

* **MSD** (Medical Segmentation Decathlon): ``dataset.json`` with ``training`` (``{image, label}``),
  ``test``, ``labels`` and ``modality``; multi-modal images are one 4D NIfTI per case (channels last).
* **nnU-Net raw** (v2): ``dataset.json`` with ``channel_names``, ``labels``, ``file_ending``;
  ``imagesTr/{case}_{XXXX}{file_ending}`` (one file per channel) and ``labelsTr/{case}{file_ending}``.
* **paired 2D folders**: ``a_dir/x.png`` goes with ``b_dir/x.png`` (e.g. DRR -> bone mask).
* **unpaired 2D folders**: two domains with no correspondence (e.g. MR slices, CT slices).

Loaders only read the description; :func:`validate` then opens every file once, before any training
starts, so a missing label, a stray label value or a misregistered label map fails in seconds with the
case id and file named instead of hours later inside a data loader.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medistill.errors import MedistillError
from medistill.io.atomic import atomic_write_text
from medistill.io.images import (
    READ_SUFFIXES,
    Grid,
    Image,
    check_same_grid,
    grid_differences,
    read_grid,
    read_image,
    write_channels,
    write_image,
)

PathLike = str | os.PathLike[str]
_MAX_REPORTED = 12


@dataclass(frozen=True)
class Case:
    """One subject: its image files (one per channel, or one multi-channel 4D NIfTI) and label map.

    In a paired 2D dataset ``label`` is the target image of the pair (a mask or another image).
    """

    id: str
    images: tuple[Path, ...]
    label: Path | None = None


@dataclass
class DatasetSpec:
    """A labelled dataset (MSD, nnU-Net raw or paired folders).

    Attributes:
        name: dataset name (from ``dataset.json`` or the folder name).
        root: folder the relative paths were resolved against.
        cases: training cases (each with a label).
        test_cases: unlabelled cases (``label is None``).
        labels: label name -> integer value, background included; empty when targets are not labels.
        channel_names: one name per image channel (e.g. ``["CT"]``, ``["T1", "T2"]``).
        file_ending: image file ending (``.nii.gz``, ``.png``, ...).
        layout: ``"msd"``, ``"nnunet"`` or ``"paired"``.
    """

    name: str
    root: Path
    cases: list[Case]
    test_cases: list[Case] = field(default_factory=list)
    labels: dict[str, int] = field(default_factory=dict)
    channel_names: list[str] = field(default_factory=list)
    file_ending: str = ".nii.gz"
    layout: str = "msd"

    @property
    def label_names(self) -> dict[int, str]:
        """Integer value -> label name."""
        return {v: k for k, v in self.labels.items()}


@dataclass
class UnpairedSpec:
    """Two image domains without correspondence (CycleGAN-style training)."""

    a_dir: Path
    b_dir: Path
    a: list[Case]
    b: list[Case]


# ---------------------------------------------------------------------------------------------- helpers


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise MedistillError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MedistillError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise MedistillError(f"{path}: expected a JSON object at the top level")
    return data


def _parse_labels(raw: Any, source: Path) -> dict[str, int]:
    """Accept MSD ``{"0": "background"}`` and nnU-Net ``{"background": 0}``; return name -> value."""
    if not isinstance(raw, Mapping) or not raw:
        raise MedistillError(f"{source}: field 'labels' must be a non-empty object")
    labels: dict[str, int] = {}
    for key, value in raw.items():
        if isinstance(value, list):
            raise MedistillError(
                f"{source}: label {key!r} is a region ({value}); region-based labels are not supported"
            )
        if str(key).lstrip("-").isdigit() and isinstance(value, str):
            name, number = value, int(key)
        elif isinstance(value, int) or (isinstance(value, str) and value.lstrip("-").isdigit()):
            name, number = str(key), int(value)
        else:
            raise MedistillError(f"{source}: field 'labels' entry {key!r}: {value!r} is not a name/id pair")
        if number in labels.values():
            raise MedistillError(f"{source}: label value {number} is declared twice in 'labels'")
        labels[name] = number
    return dict(sorted(labels.items(), key=lambda kv: kv[1]))


def _parse_channels(data: Mapping[str, Any], source: Path) -> list[str]:
    raw = data.get("channel_names", data.get("modality"))
    if raw is None:
        return []
    if not isinstance(raw, Mapping):
        raise MedistillError(
            f"{source}: field 'channel_names'/'modality' must be an object like {{'0': 'CT'}}"
        )
    try:
        ordered = sorted(raw.items(), key=lambda kv: int(kv[0]))
    except ValueError as exc:
        raise MedistillError(f"{source}: channel keys must be 0, 1, ... ({exc})") from exc
    return [str(v) for _, v in ordered]


def _image_stem(name: str) -> tuple[str, str] | None:
    """Split ``case_0000.nii.gz`` into (``case_0000``, ``.nii.gz``) for known image endings."""
    lower = name.lower()
    for suffix in READ_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)], name[-len(suffix) :]
    return None


def _case_id(path_text: str) -> str:
    stem = _image_stem(Path(path_text).name)
    return stem[0] if stem else Path(path_text).stem


# ------------------------------------------------------------------------------------------------ loaders


def load_msd(dataset_json_path: PathLike) -> DatasetSpec:
    """Load a Medical Segmentation Decathlon ``dataset.json`` (paths resolved against its folder)."""
    path = Path(dataset_json_path)
    if path.is_dir():
        path = path / "dataset.json"
    data = _read_json(path)
    root = path.parent
    training = data.get("training")
    if not isinstance(training, list):
        raise MedistillError(f"{path}: field 'training' must be a list of {{'image': ..., 'label': ...}}")
    cases = []
    for n, entry in enumerate(training):
        if not isinstance(entry, Mapping) or "image" not in entry or "label" not in entry:
            raise MedistillError(f"{path}: training[{n}] needs 'image' and 'label' entries")
        images = entry["image"] if isinstance(entry["image"], list) else [entry["image"]]
        cases.append(
            Case(_case_id(images[0]), tuple(root / str(p) for p in images), root / str(entry["label"]))
        )
    test_cases = []
    for n, entry in enumerate(data.get("test", []) or []):
        image = entry.get("image") if isinstance(entry, Mapping) else entry
        if not isinstance(image, str):
            raise MedistillError(f"{path}: test[{n}] must be an image path")
        test_cases.append(Case(_case_id(image), (root / image,), None))
    _check_unique_ids(cases + test_cases, path)
    first = cases[0].images[0].name if cases else ""
    return DatasetSpec(
        name=str(data.get("name", root.name)),
        root=root,
        cases=cases,
        test_cases=test_cases,
        labels=_parse_labels(data.get("labels"), path),
        channel_names=_parse_channels(data, path),
        file_ending=(_image_stem(first) or ("", ".nii.gz"))[1],
        layout="msd",
    )


def load_nnunet_raw(folder: PathLike) -> DatasetSpec:
    """Load an nnU-Net v2 raw dataset folder (``dataset.json``, ``imagesTr``, ``labelsTr``, ``imagesTs``).

    Cases are found from ``imagesTr`` by stripping the ``_XXXX`` channel suffix; each case expects one
    file per declared channel and ``labelsTr/{case}{file_ending}``. An explicit ``dataset`` mapping in
    ``dataset.json`` (nnU-Net's way to list files elsewhere) is honoured instead when present.
    """
    root = Path(folder)
    path = root / "dataset.json"
    data = _read_json(path)
    channels = _parse_channels(data, path)
    if not channels:
        raise MedistillError(f"{path}: field 'channel_names' is missing")
    ending = data.get("file_ending")
    if not isinstance(ending, str) or not ending.startswith("."):
        raise MedistillError(f"{path}: field 'file_ending' must be like '.nii.gz'")
    if isinstance(data.get("dataset"), Mapping):
        cases = [
            Case(str(cid), tuple(root / p for p in entry["images"]), root / entry["label"])
            for cid, entry in data["dataset"].items()
        ]
    else:
        cases = _nnunet_cases(root / "imagesTr", root / "labelsTr", ending, len(channels))
    test_cases = []
    if (root / "imagesTs").is_dir():
        test_cases = [
            Case(c.id, c.images, None) for c in _nnunet_cases(root / "imagesTs", None, ending, len(channels))
        ]
    expected = data.get("numTraining")
    if isinstance(expected, int) and expected != len(cases):
        raise MedistillError(
            f"{path}: numTraining is {expected} but {len(cases)} cases were found in {root / 'imagesTr'}"
        )
    return DatasetSpec(
        name=str(data.get("name", root.name)),
        root=root,
        cases=cases,
        test_cases=test_cases,
        labels=_parse_labels(data.get("labels"), path),
        channel_names=channels,
        file_ending=ending,
        layout="nnunet",
    )


def load_dataset(path: PathLike) -> DatasetSpec:
    """Load an MSD or nnU-Net raw dataset, telling them apart by their ``dataset.json``.

    ``path`` is the ``dataset.json`` or its folder. MSD lists its files under ``training``; nnU-Net raw
    declares ``file_ending`` and finds files in ``imagesTr``.
    """
    path = Path(path)
    json_path = path / "dataset.json" if path.is_dir() else path
    data = _read_json(json_path)
    if isinstance(data.get("training"), list):
        return load_msd(json_path)
    if "file_ending" in data:
        return load_nnunet_raw(json_path.parent)
    raise MedistillError(
        f"{json_path}: neither an MSD dataset.json (no 'training' list) nor nnU-Net raw (no 'file_ending')"
    )


def _nnunet_cases(images_dir: Path, labels_dir: Path | None, ending: str, n_channels: int) -> list[Case]:
    if not images_dir.is_dir():
        raise MedistillError(f"{images_dir}: folder not found")
    pattern = re.compile(rf"^(?P<case>.+)_(?P<ch>\d{{4}}){re.escape(ending)}$")
    found: dict[str, set[int]] = {}
    for entry in sorted(images_dir.iterdir()):
        match = pattern.match(entry.name)
        if match:
            found.setdefault(match["case"], set()).add(int(match["ch"]))
    cases = []
    for cid, chans in sorted(found.items()):
        # every declared channel file is listed even when absent, so validate() can name what is missing
        images = tuple(images_dir / f"{cid}_{c:04d}{ending}" for c in range(max(n_channels, max(chans) + 1)))
        cases.append(Case(cid, images, labels_dir / f"{cid}{ending}" if labels_dir else None))
    return cases


def _image_files(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise MedistillError(f"{folder}: folder not found")
    files: dict[str, Path] = {}
    for entry in sorted(folder.iterdir()):
        stem = _image_stem(entry.name)
        if stem and entry.is_file() and not entry.name.startswith("."):
            files[stem[0]] = entry
    if not files:
        raise MedistillError(f"{folder}: no image files ({', '.join(READ_SUFFIXES)})")
    return files


def load_paired_folder(
    a_dir: PathLike, b_dir: PathLike, labels: Mapping[str, int] | None = None
) -> DatasetSpec:
    """Pair ``a_dir/x.*`` with ``b_dir/x.*`` by file name (extension may differ, e.g. .dcm -> .png).

    ``labels`` (name -> value) declares that the B side holds label maps, so :func:`validate` checks
    their values; leave it out when B holds images (e.g. artifact-free slices).
    """
    a_dir, b_dir = Path(a_dir), Path(b_dir)
    a_files, b_files = _image_files(a_dir), _image_files(b_dir)
    only_a, only_b = sorted(set(a_files) - set(b_files)), sorted(set(b_files) - set(a_files))
    if only_a or only_b:
        parts = []
        if only_a:
            parts.append(f"{len(only_a)} only in {a_dir} (e.g. {', '.join(only_a[:3])})")
        if only_b:
            parts.append(f"{len(only_b)} only in {b_dir} (e.g. {', '.join(only_b[:3])})")
        raise MedistillError(f"paired folders do not match by file name: {'; '.join(parts)}")
    cases = [Case(stem, (a_files[stem],), b_files[stem]) for stem in sorted(a_files)]
    return DatasetSpec(
        name=f"{a_dir.name}->{b_dir.name}",
        root=a_dir.parent,
        cases=cases,
        labels=dict(labels or {}),
        channel_names=[a_dir.name],
        file_ending=(_image_stem(cases[0].images[0].name) or ("", ""))[1],
        layout="paired",
    )


def load_unpaired_folders(a_dir: PathLike, b_dir: PathLike) -> UnpairedSpec:
    """Two folders of images, each a domain; no file correspondence is implied."""
    a_dir, b_dir = Path(a_dir), Path(b_dir)
    a = [Case(stem, (p,)) for stem, p in _image_files(a_dir).items()]
    b = [Case(stem, (p,)) for stem, p in _image_files(b_dir).items()]
    return UnpairedSpec(a_dir, b_dir, a, b)


def _check_unique_ids(cases: Sequence[Case], source: Path) -> None:
    seen: set[str] = set()
    for case in cases:
        if case.id in seen:
            raise MedistillError(f"{source}: case id {case.id!r} appears twice")
        seen.add(case.id)


# ---------------------------------------------------------------------------------------------- validate


def _label_value_problem(array: np.ndarray, labels: Mapping[str, int]) -> str | None:
    """What is wrong with a label map's values (non-integer, or not among ``labels``), or None."""
    values = np.unique(array)
    if not np.all(np.mod(values, 1) == 0):
        return "holds non-integer values (interpolated? labels need nearest-neighbour resampling)"
    stray = sorted(set(values.astype(np.int64).tolist()) - set(labels.values()))
    if stray:
        return f"holds values {stray[:10]} not declared in labels {dict(labels)}"
    return None


def _case_problems(
    case: Case, labels: Mapping[str, int], n_channels: int, check_labels: bool, same_affine: bool
) -> list[str]:
    files = [*case.images, *([case.label] if case.label is not None else [])]
    missing = [p for p in files if not p.exists()]
    if missing:
        return [f"case {case.id!r}: missing file {p}" for p in missing]
    try:
        grids = [(p, read_grid(p)) for p in case.images]
    except MedistillError as exc:
        return [f"case {case.id!r}: {exc}"]
    problems = []
    found = sum(g.channels for _, g in grids)
    if n_channels and found != n_channels:
        problems.append(f"case {case.id!r}: {found} image channel(s), the dataset declares {n_channels}")

    def differences(ref: Grid, other: Grid) -> list[str]:
        if same_affine:
            return grid_differences(ref.shape, ref.affine, other.shape, other.affine)
        return [] if ref.shape == other.shape else [f"shape {ref.shape} vs {other.shape}"]

    ref_path, ref = grids[0]
    for p, grid in grids[1:]:
        diff = differences(ref, grid)
        if diff:
            problems.append(f"case {case.id!r}: {ref_path.name} and {p.name} differ: {'; '.join(diff)}")
    if case.label is None:
        return problems
    try:
        label = read_image(case.label) if check_labels and labels else None
        label_grid = Grid(label.shape, label.affine, 1) if label is not None else read_grid(case.label)
    except MedistillError as exc:
        return [*problems, f"case {case.id!r}: {exc}"]
    diff = differences(ref, label_grid)
    if diff:
        problems.append(
            f"case {case.id!r}: image {ref_path.name} and label {case.label.name} are not on the same grid: "
            + "; ".join(diff)
        )
    if label is not None:
        problem = _label_value_problem(label.array, labels)
        if problem:
            problems.append(f"case {case.id!r}: label {case.label} {problem}")
    return problems


def validate(dataset: DatasetSpec | UnpairedSpec, check_labels: bool = True) -> None:
    """Check every case before any work: files exist and open, channels and labels share the image
    grid, and label values are among the declared labels. Raises one :class:`MedistillError` listing
    up to a dozen problems, each naming the case id and the file."""
    if isinstance(dataset, UnpairedSpec):
        groups = [(dataset.a, {}, 0), (dataset.b, {}, 0)]
        name, same_affine = f"{dataset.a_dir} / {dataset.b_dir}", False
    else:
        n_channels = len(dataset.channel_names) if dataset.layout != "paired" else 0
        groups = [(dataset.cases, dataset.labels, n_channels), (dataset.test_cases, {}, n_channels)]
        # 2D pairs often mix formats (a DICOM with patient geometry, a PNG mask without): compare shapes
        name, same_affine = dataset.name, dataset.layout != "paired"
    problems: list[str] = []
    for cases, labels, n_channels in groups:
        for case in cases:
            problems += _case_problems(case, labels, n_channels, check_labels, same_affine)
    if not any(cases for cases, _, _ in groups):
        problems.append("no cases")
    if problems:
        shown = problems[:_MAX_REPORTED]
        more = f" ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        raise MedistillError(f"dataset {name}: {len(problems)} problem(s): {' | '.join(shown)}{more}")


# ------------------------------------------------------------------------------------------------- write


def write_msd(
    folder: PathLike,
    cases: Iterable[tuple[str, Image | Sequence[Image], Image | None]],
    labels: Mapping[str, int],
    *,
    name: str | None = None,
    channel_names: Sequence[str] = ("CT",),
    description: str = "",
    test_cases: Iterable[tuple[str, Image | Sequence[Image]]] = (),
    overwrite: bool = False,
) -> DatasetSpec:
    """Write an MSD-style folder (``imagesTr``, ``labelsTr``, ``imagesTs``, ``dataset.json``).

    ``cases`` yields ``(case_id, image or channel images, label)``; it may be a generator so a synthetic
    cohort never has to sit in memory at once. Each label is checked against its image grid and the
    declared ``labels`` (name -> value) as it is written. ``dataset.json`` is written last, so a folder
    that has one is complete. Returns the loaded :class:`DatasetSpec`.
    """
    root = Path(folder)
    if (root / "dataset.json").exists() and not overwrite:
        raise MedistillError(f"{root}: already holds a dataset.json (pass overwrite=True to replace it)")
    training, tests = [], []

    def write_images(cid: str, images: Image | Sequence[Image], sub: str) -> tuple[Image, str]:
        channels = [images] if isinstance(images, Image) else list(images)
        if len(channels) != len(channel_names):
            raise MedistillError(
                f"case {cid!r}: {len(channels)} channels, channel_names has {len(channel_names)}"
            )
        for n, ch in enumerate(channels[1:], start=1):
            check_same_grid(channels[0], ch, f"case {cid!r} channel 0", f"channel {n}")
        rel = f"./{sub}/{cid}.nii.gz"
        if len(channels) == 1:
            write_image(channels[0], root / rel)
        else:
            write_channels([c.array for c in channels], channels[0].affine, root / rel)
        return channels[0], rel

    for cid, images, label in cases:
        if label is None:
            raise MedistillError(f"case {cid!r}: training cases need a label (put it in test_cases instead)")
        first, rel_image = write_images(cid, images, "imagesTr")
        check_same_grid(first, label, f"case {cid!r} image", "label")
        problem = _label_value_problem(label.array, labels)
        if problem:
            raise MedistillError(f"case {cid!r}: label {problem}")
        rel_label = f"./labelsTr/{cid}.nii.gz"
        write_image(label, root / rel_label, dtype=np.uint8 if max(labels.values()) < 256 else np.int16)
        training.append({"image": rel_image, "label": rel_label})
    for cid, images in test_cases:
        tests.append(write_images(cid, images, "imagesTs")[1])
    meta = {
        "name": name or root.name,
        "description": description,
        "tensorImageSize": "4D" if len(channel_names) > 1 else "3D",
        "modality": {str(i): str(c) for i, c in enumerate(channel_names)},
        "labels": {str(v): k for k, v in sorted(labels.items(), key=lambda kv: kv[1])},
        "numTraining": len(training),
        "numTest": len(tests),
        "training": training,
        "test": tests,
    }
    atomic_write_text(root / "dataset.json", json.dumps(meta, indent=2) + "\n")
    return load_msd(root / "dataset.json")
