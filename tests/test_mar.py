"""MAR task: the shifted simulator, the DGKD step (critic trained, adversarial gradient reaches the student,
teacher frozen) and the whole pipeline on tiny phantom slices (64^2) through the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medistill.cli import main
from medistill.io.examples import is_cached
from medistill.physics import ct, metal
from medistill.tasks import mar_data

TINY = [
    "data.sources=[phantom]",
    "data.size=64",
    "data.cache=false",
    "data.slab=4",
    "data.slice_step=1",
    "data.max_eval_slices=3",
    "data.masks_per_slice=1",
    "train.steps=8",
    "train.val_every=4",
    "train.log_every=2",
    "train.checkpoint_every=4",
    "train.progress=false",
    "stages.pretrain.steps=8",
    "stages.student_dgkd.steps=8",
    "stages.student_nodisc.steps=8",
]


def _args(sets: list[str]) -> list[str]:
    return [x for s in sets for x in ("--set", s)]


def test_geometry_scales_the_deeplesion_scanner() -> None:
    assert mar_data.mar_geometry(416, 0.5) == ct.geometry_preset("deeplesion416", 0.5)
    g = mar_data.mar_geometry(128, 3.0)
    assert g.n_views % 4 == 0 and g.n_bins % 2 == 1 and g.quarter_turns() == 4
    base = ct.geometry_preset("deeplesion416")
    assert math.isclose(g.sod_mm / (g.image_size * g.pixel_mm), base.sod_mm / (416 * base.pixel_mm))


def test_detector_blur_keeps_constants_and_spreads_a_spike_by_sigma() -> None:
    flat = torch.full((1, 3, 41), 2.5)
    assert torch.allclose(mar_data._blur_bins(flat, 1.5), flat)
    spike = torch.zeros(1, 1, 41)
    spike[0, 0, 20] = 1.0
    out = mar_data._blur_bins(spike, 2.0)[0, 0]
    k = torch.arange(41.0) - 20
    assert math.isclose(float(out.sum()), 1.0, rel_tol=1e-5)
    assert math.isclose(float((out * k**2).sum()) ** 0.5, 2.0, rel_tol=0.02)


def test_shifted_chain_matches_simulate_metal_without_blur() -> None:
    """The shifted domain's chain is simulate_metal draw for draw; only the blur is added."""
    hu = torch.from_numpy(mar_data.resample(mar_data.phantom_slices(1), 48))
    geometry = mar_data.mar_geometry(48, 5.0)
    mask = torch.from_numpy(metal.random_metal_masks(hu[0].numpy(), 5.0, 1, np.random.default_rng(0)))
    scan = metal.MetalScan(metal="iron", photons=1e5)
    ref = metal.simulate_metal(hu, mask, geometry, scan, torch.Generator().manual_seed(3))
    near = mar_data.simulate_domain(hu, mask, geometry, scan, 1e-3, torch.Generator().manual_seed(3))
    assert torch.allclose(near["artifact_hu"], ref["artifact_hu"], atol=1e-2)
    assert torch.allclose(near["free_hu"], ref["free_hu"], atol=1e-2)
    blurred = mar_data.simulate_domain(hu, mask, geometry, scan, 1.0, torch.Generator().manual_seed(3))
    assert float((blurred["free_hu"] - ref["free_hu"]).abs().mean()) > 1.0  # the blur changes the scan


def test_realistic_metal_lies_in_the_body_on_teeth_or_bone() -> None:
    hu = np.full((64, 64), -1000.0, np.float32)
    hu[8:56, 8:56] = 40.0
    hu[28:34, 20:44] = 2500.0  # a row of teeth
    rng = np.random.default_rng(1)
    for _ in range(5):
        mask = mar_data.place_metal(hu, 2.0, "head-ct", rng, realistic=True)
        assert mask.sum() >= 2 and (hu[mask] > -500).all()
    assert any((hu[mar_data.place_metal(hu, 2.0, "head-ct", rng, True)] > 1800).any() for _ in range(5))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("mar") / "run"
    main(["run", "configs/mar_quick.yaml", "--out", str(run), *_args(TINY)])
    return run


def test_dgkd_step_trains_critic_and_student_through_the_adversarial_term(tiny_run: Path) -> None:
    from torch.utils.data import DataLoader

    from medistill.engine.trainer import Trainer
    from medistill.runs import open_run

    task = open_run(tiny_run)
    runner = task.runner
    stage = runner.stage("student_dgkd")
    stask = runner.task(stage)
    trainer = Trainer(stask, tiny_run / "probe", stage, runner._frozen_models(stage))
    raw, ctx, _ = trainer.build()
    ctx.distillers["kd"].weight = 0.0  # only the adversarial term can move the student now
    before = {k: [p.detach().clone() for p in m.parameters()] for k, m in raw.items()}
    teacher = ctx.frozen["teacher"]
    t_before = [p.detach().clone() for p in teacher.parameters()]
    train_set, _ = stask.build_data()
    batch = next(iter(DataLoader(train_set, batch_size=4)))
    logs = stask.training_step(batch, ctx)
    assert logs["loss_g_adv"] > 0 and logs["loss_d"] > 0
    for key in ("net", "critic"):
        moved = [not torch.equal(a, b) for a, b in zip(before[key], raw[key].parameters(), strict=True)]
        assert any(moved), f"{key} did not change"
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(a, b) for a, b in zip(t_before, teacher.parameters(), strict=True))


def test_tiny_pipeline_evaluates_predicts_and_exports(tiny_run: Path, tmp_path: Path) -> None:
    ckpt = torch.load(tiny_run / "student_dgkd" / "last.pt", weights_only=True)
    assert "critic" in ckpt["models"] and "critic" in ckpt["optimizers"]
    assert "critic" not in torch.load(tiny_run / "student_nodisc" / "last.pt", weights_only=True)["models"]
    result = json.loads((tiny_run / "eval" / "metrics.json").read_text())
    cases = result["cases"]
    for domain in ("sim", "clinical"):
        for method in ("artifact", "LI", "NMAR", "teacher", "student_dgkd", "student_nodisc"):
            row = cases[f"{domain}/{method}"]
            assert row["n_slices"] >= 1 and np.isfinite(row["psnr_db"]) and 0 < row["ssim"] <= 1
        assert cases[f"{domain}/LI"]["rmse_hu"] < cases[f"{domain}/artifact"]["rmse_hu"]
    assert (tiny_run / "eval" / "mar_sim.png").stat().st_size > 10_000
    if is_cached("radiographs"):  # the real head slice with inserted metal
        assert (tiny_run / "eval" / "mar_real_693.png").stat().st_size > 10_000
    assert "clinical domain" in (tiny_run / "eval" / "mar_tables.md").read_text()

    # a volume with a metal slice: clean slices pass unchanged, output on the input grid in HU
    vol = np.full((64, 64, 5), -1000.0, np.float32)
    vol[12:52, 12:52] = 40.0
    vol[30:33, 30:33, 2] = 3500.0
    affine = np.diag([-2.0, 2.0, 3.0, 1.0])
    src, dst = tmp_path / "ct.nii.gz", tmp_path / "mar.nii.gz"
    nib.save(nib.Nifti1Image(vol, affine), src)
    main(["predict", str(tiny_run), str(src), "--out", str(dst)])
    out = nib.load(dst)
    arr = np.asarray(out.dataobj)
    assert arr.shape == vol.shape and np.allclose(out.affine, affine)
    assert np.array_equal(arr[..., [0, 1, 3, 4]], vol[..., [0, 1, 3, 4]])
    assert np.array_equal(arr[30:33, 30:33, 2], vol[30:33, 30:33, 2])  # metal kept
    assert not np.array_equal(arr[..., 2], vol[..., 2])

    main(["export", str(tiny_run)])
    parity = json.loads((tiny_run / "export" / "parity.json").read_text())
    assert set(parity) == {"teacher.net", "student_dgkd.net", "student_nodisc.net"}
    assert all(v["max_abs_diff"] < 1e-3 for v in parity.values())


def test_dgkd_student_can_also_distil_on_the_sim_inputs(tiny_run: Path) -> None:
    """``data.student_sim_inputs``: the clinical stage's inputs are followed by the realistic simulator's
    training inputs, with no target (KD only, their ground truth unread); the real slices stay clinical."""
    from medistill.runs import open_run

    runner = open_run(tiny_run).runner
    stask = runner.task(runner.stage("student_dgkd"))
    clinical, _ = stask.build_data()
    stask.cfg.data.student_sim_inputs = True
    mixed, _ = stask.build_data()
    sim = stask.sim_set("sim", "train")
    assert len(mixed) == len(clinical) + len(sim["artifact"])
    last = mixed.get(len(mixed) - 1, None)
    assert "target" not in last and "real" in last
    np.testing.assert_array_equal(last["image"].numpy(), stask.net_input(sim)[-1])
    np.testing.assert_array_equal(mixed.real, clinical.real)
