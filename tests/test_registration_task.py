"""The registration task end to end on a tiny phantom (32^3): teacher -> student with ALDK and the no-ALDK
ablation, evaluation against known fields, export with the warp inside, predict on a pair in any geometry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from medistill.cli import main
from medistill.engine.checkpoint import load_checkpoint
from medistill.errors import MedistillError
from medistill.io.images import read_image
from medistill.tasks.registration_data import network_grid, resample

SIZE = 32


def phantom(tmp: Path) -> tuple[Path, Path]:
    """An ellipsoid body with two spheres and a block (labels 1..3), 40 x 36 x 30 voxels at 2 x 2 x 3 mm."""
    shape = (40, 36, 30)
    x, y, z = np.meshgrid(*[np.arange(n) - n / 2 for n in shape], indexing="ij")
    texture = 0.1 * np.sin(x / 2.5) * np.sin(y / 3) * np.sin(z / 2)  # so that the inside has gradients
    img = np.where((x / 18) ** 2 + (y / 16) ** 2 + (z / 13) ** 2 < 1, 0.4 + texture, 0.0)
    lab = np.zeros(shape, np.int16)
    for k, (c, r) in enumerate((((-7, 0, 0), 5), ((7, 3, 2), 4)), start=1):
        m = (x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2 < r**2
        img[m], lab[m] = 0.6 + 0.3 * k, k
    block = (abs(x) < 3) & (abs(y + 8) < 3) & (abs(z) < 6)
    img[block], lab[block] = 0.2, 3
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    nib.save(nib.Nifti1Image(img.astype(np.float32), affine), tmp / "atlas.nii.gz")
    nib.save(nib.Nifti1Image(lab, affine), tmp / "atlas_labels.nii.gz")
    return tmp / "atlas.nii.gz", tmp / "atlas_labels.nii.gz"


def config(tmp: Path, steps: int = 80) -> Path:
    import yaml

    image, label = phantom(tmp)
    data = {
        "image": str(image),
        "label": str(label),
        "modality": "mr",
        "size": SIZE,
        "n_train": 4,
        "n_val": 2,
        "n_test": 2,
        "test_pairs": 2,
        "field_amplitude": 0.08,
        "sitk_iterations": 5,
    }
    train = {
        "steps": steps,
        "batch_size": 2,
        "val_every": 30,
        "log_every": 5,
        "checkpoint_every": 20,
        "progress": False,
    }
    reg = {"sim": {"name": "pearson"}, "smooth": {"name": "grad_smooth"}}
    small = {"name": "ldr", "args": {"features": [4, 8, 8, 8]}}
    stages = [
        {
            "name": "teacher",
            "models": {
                "net": {
                    "name": "vtn_cascade",
                    "args": {
                        "cascades": 2,
                        "channels": 4,
                        "levels": 4,
                        "affine_channels": 4,
                        "affine_levels": 3,
                    },
                }
            },
            "losses": reg | {"affine": {"name": "affine_reg"}},
            "optimizers": {"main": {"type": "adam", "lr": 3e-3, "schedule": "constant"}},
        },
        {
            "name": "student_aldk",
            "steps": 30,
            "models": {"net": small, "critic": {"name": "flow_critic", "args": {"features": [4, 8]}}},
            "frozen": {"teacher": {"stage": "teacher"}},
            "losses": reg,
            "distillers": {"aldk": {"name": "aldk"}},
            "optimizers": {
                "student": {"models": ["net"], "type": "adam", "lr": 3e-3},
                "critic": {"models": ["critic"], "type": "adam", "lr": 1e-3, "betas": [0.5, 0.9]},
            },
        },
        {
            "name": "student_noaldk",
            "steps": 30,
            "models": {"net": small},
            "losses": reg,
            "optimizers": {"student": {"models": ["net"], "type": "adam", "lr": 3e-3}},
        },
    ]
    # a real-pair entry: the atlas against itself stored flipped along x (world-identical anatomy)
    img, lab = nib.load(image), nib.load(label)
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = img.shape[0] - 1
    for src, name in ((img, "flipped.nii.gz"), (lab, "flipped_labels.nii.gz")):
        nib.save(nib.Nifti1Image(np.asarray(src.dataobj)[::-1].copy(), src.affine @ flip), tmp / name)
    structures = {"a": [1], "b": [2], "c": [3]}
    side = {"image": str(image), "label": str(label), "labels": structures, "modality": "mr"}
    flipped = side | {"image": str(tmp / "flipped.nii.gz"), "label": str(tmp / "flipped_labels.nii.gz")}
    real = {"real_pairs": [{"fixed": side, "moving": flipped, "name": "flipped", "prealign": "rigid"}]}
    path = tmp / "reg.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "task": "registration",
                "seed": 1,
                "data": data,
                "train": train,
                "stages": stages,
                "export": ["student_aldk.net"],
                "eval": real,
            }
        )
    )
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("reg")
    run = tmp / "run"
    main(["run", str(config(tmp)), "--out", str(run)])
    return tmp, run


def test_stages_train_and_beat_no_registration(trained) -> None:
    _, run = trained
    result = json.loads((run / "eval" / "metrics.json").read_text())
    rows = result["cases"]
    assert set(rows) == {"no_registration", "teacher", "student_aldk", "student_noaldk", "sitk_bspline"}
    assert all(r["n_pairs"] == 2 for r in rows.values())
    assert rows["no_registration"]["tre_mm"] > 0 and rows["no_registration"]["folding_percent"] == 0
    assert rows["teacher"]["dice"] > rows["no_registration"]["dice"]  # learning happened
    assert all(np.isfinite(r["tre_mm"]) and r["seconds"] > 0 for r in rows.values())
    for stage in ("teacher", "student_aldk", "student_noaldk"):
        rows_log = [json.loads(x) for x in (run / stage / "metrics.jsonl").read_text().splitlines()]
        assert any(r["phase"] == "val" for r in rows_log)  # validation runs during training
    # the critic is a trained, checkpointed model with its own optimizer
    state = load_checkpoint(run / "student_aldk" / "last.pt")
    assert set(state["optimizers"]) == {"student", "critic"} and "critic" in state["models"]
    logs = [json.loads(x) for x in (run / "student_aldk" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss_adv"]) for r in logs if r["phase"] == "train")
    assert (run / "eval" / "registration.png").exists()
    # the real-pair path: its own table (after the synthetic one), markdown file and figure; the same
    # anatomy stored flipped is put back by the pre-alignment alone
    real = result["real_pairs"]["flipped"]
    assert set(real) == set(rows)
    assert min(real["no_registration"][f"dice_{s}"] for s in "abc") > 0.8
    assert [t["title"] for t in result["tables"]] == [
        "Synthetic test pairs (known fields)",
        "Real inter-patient pairs",
    ]
    assert (run / "eval" / "real_pairs.png").exists() and (run / "eval" / "real_pairs.md").exists()
    assert "Real inter-patient pairs" in (run / "report.html").read_text()


def test_export_has_the_warp_and_matches(trained) -> None:
    _, run = trained
    main(["export", str(run), "--tolerance", "1e-4"])
    parity = json.loads((run / "export" / "parity.json").read_text())
    assert parity["student_aldk.net"]["max_abs_diff"] < 1e-4


def test_predict_writes_fixed_geometry_and_world_displacement(trained) -> None:
    tmp, run = trained
    atlas, labels = tmp / "atlas.nii.gz", tmp / "atlas_labels.nii.gz"
    # the fixed image: the atlas stored flipped along x (another orientation, same anatomy)
    img = nib.load(atlas)
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = img.shape[0] - 1
    fixed = tmp / "fixed.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[::-1].copy(), img.affine @ flip), fixed)
    out = tmp / "pred"
    main(
        [
            "predict",
            str(run),
            "--fixed",
            str(fixed),
            "--moving",
            str(atlas),
            "--moving-labels",
            str(labels),
            "--out",
            str(out),
        ]
    )
    disp = nib.load(out / "displacement.nii.gz")
    assert disp.shape == (40, 36, 30, 1, 3) and disp.header.get_intent()[0] == "vector"
    np.testing.assert_allclose(disp.affine, img.affine @ flip)
    warped = read_image(out / "warped.nii.gz")
    assert warped.shape == (40, 36, 30)
    lab = read_image(out / "warped_labels.nii.gz")
    fixed_lab = np.asarray(nib.load(labels).dataobj)[::-1]
    dice = [
        2 * ((lab.array == k) & (fixed_lab == k)).sum() / ((lab.array == k).sum() + (fixed_lab == k).sum())
        for k in (1, 2, 3)
    ]
    assert min(dice) > 0.6  # the same anatomy in another storage order: the labels land on it
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 < metrics["network_seconds"] <= metrics["total_seconds"]
    # a 2D image fails in one line before any work
    flat = tmp / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.float32), np.eye(4)), flat)
    with pytest.raises(MedistillError, match="3D"):
        from medistill.runs import open_run

        open_run(run).predict_pair(flat, atlas, tmp / "p2")


def test_network_grid_resampling_keeps_world_positions() -> None:
    affine = np.array([[0, -2.0, 0, 30], [1.5, 0, 0, -10], [0, 0, 3.0, 5], [0, 0, 0, 1]])
    shape = (10, 12, 8)
    grid = network_grid(affine, shape, 16)
    i, j, k = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    world = affine[:3, :3] @ np.stack([i, j, k]).reshape(3, -1) + affine[:3, 3:4]
    vol = (world[0] + 2 * world[1] - world[2]).reshape(shape)  # linear in world coordinates
    out = resample(vol, affine, grid, (16, 16, 16))[0].numpy()
    p = np.stack(np.meshgrid(*[np.arange(16)] * 3, indexing="ij")).reshape(3, -1)
    wg = grid[:3, :3] @ p + grid[:3, 3:4]
    np.testing.assert_allclose(out.reshape(-1), wg[0] + 2 * wg[1] - wg[2], atol=1e-3)


def _field_kd_stage(run: Path, name: str, weight: float = 1.0) -> tuple[Any, Any, Any, dict]:
    """``student_noaldk`` of the tiny run with a frozen teacher and an ``output_match`` field-KD
    distiller: (runner, stage, its task, one training batch of 2)."""
    from torch.utils.data import DataLoader

    from medistill.config import DistillerSpec, FrozenSpec
    from medistill.runs import open_run

    runner = open_run(run).runner
    stage = runner.stage("student_noaldk").model_copy(
        update={
            "name": name,
            "frozen": {"teacher": FrozenSpec(stage="teacher")},
            "distillers": {"flow_kd": DistillerSpec(name="output_match", weight=weight, args={"norm": "l1"})},
        }
    )
    stask = runner.task(stage)
    return runner, stage, stask, next(iter(DataLoader(stask.build_data()[0], batch_size=2)))


def test_field_kd_pulls_the_student_to_the_teachers_field(trained) -> None:
    """A stage with a frozen teacher and an ``output_match`` distiller (no critic): the student's
    displacement moves towards the teacher's on the same pair; the teacher gets no gradient."""
    from medistill.engine.trainer import Trainer

    _, run = trained
    runner, stage, stask, batch = _field_kd_stage(run, "student_fieldkd", 10.0)

    def train(weight: float) -> tuple[float, float, dict, nn.Module, list[torch.Tensor]]:
        torch.manual_seed(0)
        raw, ctx, _ = Trainer(stask, run / "probe_fieldkd", stage, runner._frozen_models(stage)).build()
        ctx.distillers["flow_kd"].weight = weight
        teacher = ctx.frozen["teacher"]
        before = [p.detach().clone() for p in teacher.parameters()]

        def gap() -> float:
            with torch.no_grad():
                f, m = batch["fixed"], batch["moving"]
                return float((raw["net"](f, m) - teacher.model(f, m)).abs().mean())

        start = gap()
        for _ in range(10):
            logs = stask.training_step(batch, ctx)
        return start, gap(), logs, teacher, before

    start, plain, _, _, _ = train(0.0)
    start_kd, with_kd, logs, teacher, before = train(10.0)
    assert start_kd == pytest.approx(start)  # the same initial student
    assert "loss_flow_kd" in logs and with_kd < start and with_kd < plain - 0.01  # closer than without KD
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters(), strict=True))


def test_instance_optimisation_lowers_the_stage_loss_and_the_error(trained, tmp_path: Path) -> None:
    """``refine``: Adam steps on the deployed stage's own loss, from its network's field: the loss and the
    error against the known field go down; 0 steps is the network; evaluate gets its row, predict its
    option."""
    from medistill.nets.registration import warp
    from medistill.runs import open_run
    from medistill.tasks.registration import score_test_pair
    from medistill.tasks.registration_refine import stage_objective

    tmp, run = trained
    task = open_run(run)
    stage = task.runner.deployables()[-1][0]
    test = task.pair_set("test", limit=2)
    c = task.cohort()
    labels = {n: k for k, n in enumerate(c["structures"], start=1)}
    net = task.stage_model(stage)
    b = test[0]
    f, m = b["fixed"][None], b["moving"][None]
    with torch.no_grad():
        u0 = net(f, m)
    loss = stage_objective(task, stage)
    assert task.refine(stage, f, m, u0, steps=0) is u0
    u = task.refine(stage, f, m, u0, steps=40)
    assert float(loss(f, warp(m, u), u)) < float(loss(f, warp(m, u0), u0))
    before, after = (score_test_pair(test, 0, v, labels, c["spacing"]) for v in (u0, u))
    assert after["tre_mm"] < before["tre_mm"] and after["folding_percent"] < 0.1

    task.cfg.refine.steps = 5
    methods = task.methods()
    assert f"{stage} + IO 5" in methods and not torch.equal(
        methods[f"{stage} + IO 5"](f, m), methods[stage](f, m)
    )

    atlas = tmp / "atlas.nii.gz"
    out = tmp_path / "pred"
    main(
        [
            "predict",
            str(run),
            "--fixed",
            str(atlas),
            "--moving",
            str(atlas),
            "--out",
            str(out),
            "--refine-steps",
            "3",
        ]
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["refine_steps"] == 3 and metrics["refine_seconds"] > 0
    with pytest.raises(SystemExit):
        main(["predict", str(run), str(atlas), "--out", str(tmp_path / "x.nii.gz"), "--refine-steps", "3"])


def test_predict_prealigns_scans_whose_fields_of_view_differ(trained, tmp_path: Path) -> None:
    """``--prealign affine``: the moving scan covers part of the fixed one's field of view (same world
    positions); box-to-box correspondence stretches it, the classical pre-alignment does not."""
    tmp, run = trained
    atlas, labels = tmp / "atlas.nii.gz", tmp / "atlas_labels.nii.gz"
    img, lab = nib.load(atlas), nib.load(labels)
    crop = tmp_path / "crop.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:28].copy(), img.affine), crop)
    nib.save(
        nib.Nifti1Image(np.asarray(lab.dataobj)[:28].copy(), lab.affine), tmp_path / "crop_labels.nii.gz"
    )
    truth = np.asarray(lab.dataobj)[:28]

    def dice(prealign: str) -> float:
        out = tmp_path / prealign
        main(["predict", str(run), "--fixed", str(atlas), "--moving", str(crop), "--moving-labels",
              str(tmp_path / "crop_labels.nii.gz"), "--out", str(out), "--refine-steps", "0",
              "--prealign", prealign])  # fmt: skip
        warped = np.asarray(nib.load(out / "warped_labels.nii.gz").dataobj)[:28]
        m = json.loads((out / "metrics.json").read_text())
        assert m["prealign"] == prealign and len(m["prealign_matrix"]) == 4
        return float(
            np.mean(
                [
                    2 * ((warped == k) & (truth == k)).sum() / ((warped == k).sum() + (truth == k).sum())
                    for k in (1, 2, 3)
                ]
            )
        )

    none, affine = dice("none"), dice("affine")
    assert affine > 0.6 and affine > none + 0.1, (none, affine)
    with pytest.raises(SystemExit):
        main(["predict", str(run), "--fixed", str(atlas), "--moving", str(crop),
              "--out", str(tmp_path / "bad"), "--prealign", "bspline"])  # fmt: skip


def test_refined_teacher_targets_have_a_lower_teacher_loss(trained) -> None:
    """``refine.teacher_steps``: a distillation stage's target is the frozen teacher's field on the very
    (augmented) training pair after instance optimisation on the registration loss (here the teacher's)."""
    from medistill.engine.trainer import Trainer
    from medistill.nets.registration import warp
    from medistill.tasks.registration_refine import stage_objective

    _, run = trained
    runner, stage, stask, batch = _field_kd_stage(run, "student_iokd")
    _, ctx, _ = Trainer(stask, run / "probe_iokd", stage, runner._frozen_models(stage)).build()
    raw = stask._teacher_field(ctx, batch)
    stask.cfg.refine.teacher_steps = 10
    refined = stask._teacher_field(ctx, batch)
    loss = stage_objective(stask, "teacher")
    m = batch["moving"]
    assert not refined.requires_grad and refined.shape == raw.shape
    f = batch["fixed"]
    assert float(loss(f, warp(m, refined), refined)) < float(loss(f, warp(m, raw), raw))


def _pairs_dataset(tmp: Path) -> Path:
    """A pairs file over four phantoms: the atlas deformed by four smooth fields (own files + labels)."""
    from medistill.nets.registration import SpatialTransformer
    from medistill.tasks.registration_data import smooth_field

    image, label = phantom(tmp)
    img, lab = nib.load(image), nib.load(label)
    vol = torch.from_numpy(np.asarray(img.dataobj, np.float32))[None, None]
    seg = torch.from_numpy(np.asarray(lab.dataobj).astype(np.float32))[None, None]
    names = []
    for k in range(4):
        u = smooth_field(vol.shape[2:], np.random.default_rng(k), 2.5)[None]
        w = SpatialTransformer()(vol, u)[0, 0].numpy()
        s = SpatialTransformer("nearest", "zeros")(seg, u)[0, 0].numpy().astype(np.int16)
        nib.save(nib.Nifti1Image(w, img.affine), tmp / f"s{k}.nii.gz")
        nib.save(nib.Nifti1Image(s, img.affine), tmp / f"s{k}_seg.nii.gz")
        names.append(f"s{k}")

    def side(n: str) -> dict:
        return {"image": f"{n}.nii.gz", "label": f"{n}_seg.nii.gz", "modality": "mr"}

    pairs = {
        "labels": {"a": [1], "b": [2], "c": [3]},
        "training": [
            {"fixed": side(a), "moving": side(b), "prealign": "none"} for a, b in (("s0", "s1"), ("s1", "s0"))
        ],
        "validation": [{"fixed": side("s2"), "moving": side("s0"), "prealign": "none"}],
        "test": [{"fixed": side("s3"), "moving": side("s1"), "prealign": "none", "name": "s1 -> s3"}],
    }
    path = tmp / "pairs.json"
    path.write_text(json.dumps(pairs))
    return path


def test_own_pairs_file_trains_validates_and_evaluates_on_its_splits(tmp_path: Path) -> None:
    import yaml

    from medistill.tasks.registration_pairs import read_pairs_file

    pairs = _pairs_dataset(tmp_path)
    base = yaml.safe_load(config(tmp_path).read_text())
    base["data"] = {"pairs_file": str(pairs), "size": SIZE, "modality": "mr", "sitk_iterations": 3}
    base["eval"] = {}
    base["stages"] = [base["stages"][2] | {"name": "net", "steps": 6}]
    base["export"] = ["net.net"]
    path = tmp_path / "own.yaml"
    path.write_text(yaml.safe_dump(base))
    run = tmp_path / "run"
    main(["run", str(path), "--out", str(run)])
    splits = json.loads((run / "splits.json").read_text())
    assert splits["test"] == ["s1 -> s3"] and len(splits["train"]) == 2
    result = json.loads((run / "eval" / "metrics.json").read_text())
    assert set(result["cases"]) == {"no_registration", "net", "sitk_bspline"}
    assert result["real_pairs"]["s1 -> s3"]["net"]["dice"] > 0.3
    assert all(np.isfinite(r["dice"]) and r["n_pairs"] == 1 for r in result["cases"].values())
    logs = [json.loads(x) for x in (run / "net" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["phase"] == "val" and np.isfinite(r["dice"]) for r in logs)

    # problems are named before any work, with the entry and the field
    bad = json.loads(pairs.read_text())
    bad["test"][0]["moving"]["image"] = "nowhere.nii.gz"
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(MedistillError, match=r"test\[0\]\.moving\.image: .*nowhere.nii.gz not found"):
        read_pairs_file(tmp_path / "bad.json")
    del bad["validation"]
    bad["test"][0]["moving"]["image"] = "s1.nii.gz"
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(MedistillError, match="'validation' needs at least one pair"):
        read_pairs_file(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(MedistillError, match="not valid JSON"):
        read_pairs_file(tmp_path / "bad.json")
