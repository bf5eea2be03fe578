"""The brain-only synthesis pair (``data.pair: brain``): the preparation of a brain CT whose background is
0 HU (air outside the brain, brain HU kept, a cache keyed by the inputs), the pair option choosing the
brain-mr / brain-ct files, the head pair unchanged, and bad pair settings refused in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from example_data import require_example
from medistill.config import validate_config
from medistill.errors import MedistillError
from medistill.io import examples
from medistill.io.images import Image, read_image, write_image
from medistill.tasks import synthesis_brain
from medistill.tasks.brain_tissue import brain_mr_files
from medistill.tasks.synthesis import SynthesisTask
from medistill.tasks.synthesis_brain import AIR_HU, prepare_brain_pair, strip_brain_ct
from medistill.tasks.synthesis_data import RegistrationConfig, reference_key

#: the head pair's registration cache key (default settings) from before the brain pair existed: cached
#: head references stay valid only while this holds
HEAD_REFERENCE_KEY = "ccabe3d1cc2b546fab92"


def ball(shape: tuple[int, int, int], radius: float, centre: tuple[float, ...] | None = None) -> np.ndarray:
    c = np.array(centre if centre is not None else [(n - 1) / 2 for n in shape])
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    return np.linalg.norm(grid - c, axis=-1) < radius


def brain_ct(shape: tuple[int, int, int] = (30, 28, 26)) -> np.ndarray:
    """A brain CT like the atlas: 0 HU background, brain 20..50 HU, an enclosed 0 HU ventricle, and a
    detached speck of 40 HU (not brain)."""
    hu = np.zeros(shape, np.float32)
    brain = ball(shape, 10)
    hu[brain] = 20 + 30 * np.random.default_rng(0).random(int(brain.sum()))
    hu[ball(shape, 3)] = 0.0  # CSF of exactly 0 HU inside: a hole the fill must keep
    hu[1, 1, 1] = 40.0
    return hu


def write_brain_inputs(folder: Path, ct_hu: np.ndarray) -> tuple[Path, Path]:
    """A tiny brain-mr folder (T1, GM, WM maps under the registry's names, 2 mm) and a brain CT (1 mm)."""
    mr_folder = folder / "brain-mr"
    mr_folder.mkdir(parents=True, exist_ok=True)
    shape, affine = (24, 26, 22), np.diag([2.0, 2.0, 2.0, 1.0])
    wm, gm = ball(shape, 6), ball(shape, 8) & ~ball(shape, 6)
    t1 = np.where(wm, 200.0, np.where(gm, 120.0, 0.0)).astype(np.float32)
    for name, array in zip(brain_mr_files(), (t1, gm * 255.0, wm * 255.0), strict=True):
        write_image(Image(array, affine), mr_folder / name, dtype=np.uint8)
    ct_file = folder / "brain_ct.nii.gz"
    write_image(Image(ct_hu, np.diag([1.0, 1.0, 1.0, 1.0])), ct_file, dtype=np.int16)
    return mr_folder, ct_file


def test_strip_puts_air_outside_the_brain_and_keeps_its_hu() -> None:
    hu = brain_ct()
    out, mask = strip_brain_ct(Image(hu, np.eye(4)))
    assert np.all(out.array[~mask] == AIR_HU)
    assert mask.sum() == ball(hu.shape, 10).sum()  # the ventricle is inside, the speck is not
    # the crop moves the origin: map the kept voxels back to the input's indices to compare HU
    offset = np.round(out.affine[:3, 3]).astype(int)
    kept = np.argwhere(mask) + offset
    np.testing.assert_array_equal(out.array[mask], hu[tuple(kept.T)])
    assert np.any(out.array[mask] == 0.0)  # the 0 HU CSF inside stays 0 HU, not air
    assert np.percentile(out.array, 1) == AIR_HU  # the pipeline's CT check (air near -1000) now holds


def test_strip_refuses_an_empty_ct() -> None:
    with pytest.raises(MedistillError, match="no nonzero voxel"):
        strip_brain_ct(Image(np.zeros((6, 6, 6), np.float32), np.eye(4)), "empty.nii.gz")


def test_prepared_pair_is_cached_and_keyed_by_its_inputs(tmp_path: Path) -> None:
    mr_folder, ct_file = write_brain_inputs(tmp_path / "in", brain_ct())
    first = prepare_brain_pair(mr_folder, ct_file, tmp_path / "cache")
    assert first.mr.parent == tmp_path / "cache" / first.key
    ct, mr = read_image(first.ct), read_image(first.mr)
    assert ct.array.min() == AIR_HU and 20 <= np.median(ct.array[ct.array > AIR_HU]) <= 50
    # the CT brain is scaled (affine only) to the MR brain's volume
    ct_ml = (ct.array > AIR_HU).sum() * abs(np.linalg.det(ct.affine[:3, :3])) / 1000
    mr_ml = (mr.array > 0).sum() * abs(np.linalg.det(mr.affine[:3, :3])) / 1000
    assert ct_ml == pytest.approx(mr_ml, rel=0.1)
    stamp = first.ct.stat().st_mtime_ns
    assert prepare_brain_pair(mr_folder, ct_file, tmp_path / "cache") == first
    assert first.ct.stat().st_mtime_ns == stamp  # not rebuilt
    changed = brain_ct()
    changed[ball(changed.shape, 10) & ~ball(changed.shape, 3)] += 5.0
    write_image(Image(changed, np.eye(4)), ct_file, dtype=np.int16)
    second = prepare_brain_pair(mr_folder, ct_file, tmp_path / "cache")
    assert second.key != first.key and first.ct.is_file() and second.ct.is_file()
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]  # no temporary left


def brain_task(tmp_path: Path, data: dict[str, object]) -> SynthesisTask:
    cfg = validate_config({"task": "mr2ct_synthesis", "data": data})
    return SynthesisTask(cfg, tmp_path / "run")  # type: ignore[arg-type]


def test_pair_brain_selects_the_prepared_brain_mr_and_brain_ct(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_example("brain-mr")
    require_example("brain-ct")
    monkeypatch.setattr(synthesis_brain, "brain_pair_root", lambda: tmp_path / "cache")
    mr_path, ct_path = brain_task(tmp_path, {"pair": "brain"}).sources()
    assert mr_path.parent == ct_path.parent and mr_path.parent.parent == tmp_path / "cache"
    info = (mr_path.parent / synthesis_brain.INFO_FILE).read_text()
    registry = examples.get("brain-mr").sha256 | examples.get("brain-ct").sha256
    for name in (brain_mr_files()[0], "ct_brain_atlas_1mm.nii.gz"):
        assert f'"{name}": "{registry[name]}"' in info
    ct = read_image(ct_path)
    assert ct.array.min() == AIR_HU and np.percentile(ct.array, 1) == AIR_HU
    assert 25 <= float(np.median(ct.array[ct.array > AIR_HU])) <= 50  # brain HU, not a background


def test_head_pair_is_unchanged(tmp_path: Path) -> None:
    head_mr, head_ct = require_example("head-mr"), require_example("head-ct")
    task = brain_task(tmp_path, {})
    assert task.cfg.data.pair == "head"
    assert task.sources() == (head_mr / "ch2.nii.gz", head_ct / "head_ct.nii.gz")
    assert reference_key(*task.sources(), RegistrationConfig()) == HEAD_REFERENCE_KEY
    assert task.reference_name == "head-ct (CT)"


def test_a_saved_brain_config_spelling_out_the_defaults_loads(tmp_path: Path) -> None:
    """``RUN/config.yaml`` holds every field, the head pair's example names included."""
    cfg = validate_config({"task": "mr2ct_synthesis", "data": {"pair": "brain"}})
    again = validate_config(cfg.model_dump(mode="json"))
    assert again.data == cfg.data  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"pair": "knee"}, "data.pair: Input should be 'head' or 'brain'"),
        ({"pair": "brain", "mr": "t1.nii.gz"}, "remove data.mr"),
        ({"pair": "brain", "ct_example": "chest-ct"}, "remove data.ct_example"),
    ],
)
def test_bad_pair_settings_are_refused_in_one_line(data: dict[str, object], expected: str) -> None:
    with pytest.raises(MedistillError) as err:
        validate_config({"task": "mr2ct_synthesis", "data": data}, source="cfg.yaml")
    assert expected in str(err.value) and "\n" not in str(err.value)
