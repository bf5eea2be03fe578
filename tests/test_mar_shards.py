"""``data.shards``: MAR stages train on ``simulate metal`` folders read lazily, split by slabs of slices,
and evaluate their held-out test slabs; bad folders fail before any work."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medistill.cli import main
from medistill.errors import MedistillError
from medistill.io.images import Image, write_image
from medistill.physics import ct
from medistill.tasks.mar_shards import ShardFolders

SIZE = 64
SLICES = 14
TINY = [
    "data.sources=[phantom]",
    "data.size=64",
    "data.cache=false",
    "data.slab=3",
    "data.max_eval_slices=3",
    "data.masks_per_slice=1",
    "train.steps=4",
    "train.val_every=2",
    "train.log_every=2",
    "train.checkpoint_every=2",
    "train.progress=false",
    "stages.pretrain.steps=4",
    "stages.student_dgkd.steps=4",
    "stages.student_nodisc.steps=4",
]


def _args(sets: list[str]) -> list[str]:
    return [x for s in sets for x in ("--set", s)]


def _tiny() -> ct.CTGeometry:
    sod = 2.6 * SIZE
    spacing = ct._fan_arc_spacing(SIZE, sod, 73)
    return ct.CTGeometry(SIZE, 1.0, 60, 73, spacing, beam="fan", detector="arc", sod_mm=sod, sdd_mm=2 * sod)


def _simulate(tmp: Path, name: str, baselines: bool = True) -> Path:
    x, y = np.meshgrid(*[np.linspace(-1, 1, 80)] * 2, indexing="ij")
    hu = np.full((80, 80, SLICES), -1000.0, np.float32)
    for z in range(SLICES):  # a body whose bone moves from slice to slice
        hu[..., z][(x**2 + y**2) < 0.8**2] = 30.0
        hu[..., z][((x - 0.3 + 0.02 * z) ** 2 + y**2) < 0.15**2] = 900.0
    src = tmp / f"{name}.nii.gz"
    write_image(Image(hu, np.diag([0.8, 0.8, 2.5, 1.0])), src)
    out = tmp / name
    args = ["simulate", "metal", str(src), "--geometry", "tiny", "--masks-per-slice", "2", "--out", str(out)]
    main(args + (["--baselines"] if baselines else []))
    return out


@pytest.fixture(scope="module")
def shard_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("mar_shards")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(ct.PRESETS, "tiny", _tiny)
        folder = _simulate(tmp, "sims")
    run = tmp / "run"
    main(["run", "configs/mar_quick.yaml", "--out", str(run), *_args([*TINY, f"data.shards=[{folder}]"])])
    return folder, run


def test_split_is_by_slabs_of_slices_and_reads_nothing_until_asked(
    shard_run: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, _ = shard_run
    shards = ShardFolders([str(folder)], SIZE)
    assert len(shards.samples) == 2 * SLICES
    split = shards.split(slab=3, max_train=100, max_eval=100)
    slices = {k: {s.slice for s in v} for k, v in split.items()}
    assert not (
        slices["train"] & slices["val"] or slices["train"] & slices["test"] or slices["val"] & slices["test"]
    )
    for z in slices["train"]:  # a gap slice separates every training slice from the held-out ones
        assert z - 1 not in slices["val"] | slices["test"] and z + 1 not in slices["val"] | slices["test"]
    assert {s.mask for s in split["train"]} == {0, 1} and {s.mask for s in split["test"]} == {0}

    from medistill.runs import open_run

    runner = open_run(shard_run[1]).runner
    teacher = runner.task(runner.stage("teacher"))
    reads: list[str] = []
    real_load = np.load
    monkeypatch.setattr(np, "load", lambda path, *a, **k: reads.append(str(path)) or real_load(path, *a, **k))
    train_set, val_set = teacher.build_data()
    assert reads == [] and len(train_set) == len(split["train"]) > len(val_set) > 0
    item = train_set.get(3, None)
    assert len(reads) == 1  # one shard opened for every field of one item
    sample = teacher.shard_split()["train"][3]
    with real_load(folder / sample.shard) as f:
        art, free, mask = (f[k][sample.mask] for k in ("artifact_hu", "free_hu", "metal_mask"))
    np.testing.assert_allclose(item["image"][0].numpy(), np.clip(art, -1024, 3071) / 1000, rtol=1e-6)
    np.testing.assert_allclose(item["target"][0].numpy(), free / 1000, rtol=1e-6)
    np.testing.assert_array_equal(item["metal"][0].numpy(), mask.astype(np.float32))


def test_clinical_stage_takes_inputs_and_real_slices_from_disjoint_slices(
    shard_run: tuple[Path, Path],
) -> None:
    from medistill.runs import open_run

    runner = open_run(shard_run[1]).runner
    student = runner.task(runner.stage("student_dgkd"))
    train_set, _ = student.build_data()
    inputs = {s.slice for s in train_set.image.samples}
    real = {s.slice for s in train_set.real.samples}
    assert inputs and real and not inputs & real
    item = train_set.get(0, np.random.default_rng(0))
    assert "target" not in item and item["real"].shape == item["metal"].shape


def test_pipeline_trains_on_shards_and_evaluates_their_test_slabs(shard_run: tuple[Path, Path]) -> None:
    folder, run = shard_run
    splits = json.loads((run / "splits.json").read_text())
    train = {k.rsplit("_m", 1)[0] for k in splits["train"] if k.startswith("shards:")}
    test = {k.rsplit("_m", 1)[0] for k in splits["test"] if k.startswith("shards:")}
    assert train and test and not train & test
    cases = json.loads((run / "eval" / "metrics.json").read_text())["cases"]
    n_test = len(test)
    for method in ("artifact", "LI", "NMAR", "teacher", "student_dgkd"):
        row = cases[f"shards/{method}"]
        assert row["n_slices"] == n_test and np.isfinite(row["psnr_db"])
    assert cases["shards/LI"]["rmse_hu"] < cases["shards/artifact"]["rmse_hu"]
    assert "shards domain" in (run / "eval" / "mar_tables.md").read_text()


def test_smaller_training_size_resamples_images_masks_and_pixel_size(shard_run: tuple[Path, Path]) -> None:
    folder, _ = shard_run
    full, half = ShardFolders([str(folder)], SIZE), ShardFolders([str(folder)], SIZE // 2)
    a, b = full.read(full.samples[0]), half.read(half.samples[0])
    assert b["artifact"].shape == (1, SIZE // 2, SIZE // 2)
    assert b["pixel_mm"][0] == pytest.approx(2 * a["pixel_mm"][0])
    np.testing.assert_allclose(b["free"].mean(), a["free"].mean(), rtol=1e-4)  # area averaging keeps the mean
    assert b["mask"].any() and b["mask"].sum() <= a["mask"].sum()


def test_bad_shard_folders_fail_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(ct.PRESETS, "tiny", _tiny)
    plain = _simulate(tmp_path, "plain", baselines=False)
    with pytest.raises(MedistillError, match="without --baselines"):
        ShardFolders([str(plain)], SIZE)
    with pytest.raises(MedistillError, match="no index.csv"):
        ShardFolders([str(tmp_path / "nowhere")], SIZE)
    good = _simulate(tmp_path, "good")
    next(good.glob("slice_*.npz")).unlink()
    with pytest.raises(MedistillError, match="missing"):
        ShardFolders([str(good)], SIZE)
    with pytest.raises(MedistillError, match="smaller than data.size"):
        ShardFolders([str(plain.parent / "good")], 2 * SIZE)
    run = tmp_path / "run"  # through the CLI: one line, and no run folder left behind
    with pytest.raises(SystemExit):
        main(["run", "configs/mar_quick.yaml", "--out", str(run), *_args([*TINY, f"data.shards=[{plain}]"])])
    assert not run.exists()
