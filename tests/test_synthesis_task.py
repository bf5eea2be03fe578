"""The synthesis task end to end on two tiny synthetic heads (seconds): registration reference, CycleGAN
stage with CC + mask + shape discriminator, distilled student, evaluation, volume predict, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from medistill.cli import main
from medistill.engine.checkpoint import load_checkpoint
from medistill.io.images import Image, read_image, write_image


def head(
    shape: tuple[int, int, int], radii: tuple[float, float, float], values: dict[str, float]
) -> np.ndarray:
    """An ellipsoidal head: background, scalp, skull shell, brain (values per part)."""
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    r = np.sqrt(sum((g / rad) ** 2 for g, rad in zip(grids, radii, strict=True)))
    out = np.full(shape, values["background"], np.float32)
    out[r < 1.0] = values["scalp"]
    out[r < 0.9] = values["skull"]
    out[r < 0.75] = values["brain"]
    return out


def write_pair(folder: Path) -> tuple[Path, Path]:
    """A T1-like MR (RAS, 2.5 mm) and a CT of a slightly different head (LAS, 3 x 3 x 4 mm) in HU."""
    mr = head((32, 36, 24), (0.8, 0.85, 0.8), {"background": 0, "scalp": 140, "skull": 15, "brain": 90})
    mr += np.random.default_rng(0).normal(0, 2, mr.shape).astype(np.float32).clip(0) * (mr > 0)
    ct = head((28, 30, 16), (0.82, 0.8, 0.85), {"background": -1000, "scalp": 30, "skull": 1100, "brain": 35})
    mr_path, ct_path = folder / "mr.nii.gz", folder / "ct.nii.gz"
    write_image(Image(mr.clip(0), np.diag([2.5, 2.5, 2.5, 1.0])), mr_path)
    ct_affine = np.diag([-3.0, 3.0, 4.0, 1.0])
    ct_affine[:3, 3] = [40.0, -5.0, 3.0]
    write_image(Image(ct, ct_affine), ct_path, dtype=np.int16)
    return mr_path, ct_path


def tiny_config(folder: Path, mr: Path, ct: Path) -> Path:
    gen = {"ngf": 4, "n_blocks": 1, "upsample": "resize"}
    disc = {"ndf": 4, "n_layers": 2}
    opt = {"type": "adam", "lr": 2.0e-3, "betas": [0.5, 0.999], "schedule": "constant"}
    cfg = {
        "task": "mr2ct_synthesis",
        "seed": 1,
        "data": {
            "mr": str(mr),
            "ct": str(ct),
            "size": 32,
            "fov_mm": 112.0,
            "slab": 3,
            "min_head_fraction": 0.2,
            "reference_cache": False,
            "registration": {
                "spacing_mm": 5.0,
                "affine_iterations": 100,  # converged: head Dice 0.82 (30: 0.74)
                "bspline_mesh": 2,
                "bspline_iterations": 3,
            },
        },
        "train": {
            "steps": 24,
            "batch_size": 2,
            "log_every": 4,
            "val_every": 12,
            "checkpoint_every": 12,
            "progress": False,
            "grad_clip": None,
        },
        "stages": [
            {
                "name": "cc_shape",
                "models": {
                    "net": {"name": "resnet_generator", "args": gen},
                    "ct2mr": {"name": "resnet_generator", "args": gen},
                    "d_ct": {"name": "patchgan", "args": disc | {"augment": ["translation", "cutout"]}},
                    "d_mr": {"name": "patchgan", "args": disc},
                    "d_shape": {"name": "patchgan", "args": disc},
                },
                "ema": {"net": 0.9},
                "losses": {
                    "adv": {"name": "gan"},
                    "cycle_mr": {"name": "l1", "weight": 2.0},
                    "cycle_ct": {"name": "l1", "weight": 10.0},
                    "identity": {"name": "l1", "weight": 1.0},
                    "cc": {"name": "correlation", "weight": 2.0},
                    "mask": {"name": "mask_consistency", "weight": 5.0},
                    "shape_adv": {"name": "gan", "weight": 1.0},
                },
                "optimizers": {
                    "gen": {"models": ["net", "ct2mr"], **opt},
                    "disc": {"models": ["d_ct", "d_mr", "d_shape"], **opt},
                },
            },
            {
                "name": "student",
                "steps": 12,
                "models": {
                    "net": {"name": "resnet_generator", "args": {"ngf": 2, "n_blocks": 1}},
                    "d_ct": {"name": "patchgan", "args": disc},
                },
                "frozen": {"teacher": {"stage": "cc_shape", "features": ["blocks"]}},
                "distillers": {
                    "kd": {"name": "output_match", "weight": 10.0},
                    "fkd": {
                        "name": "feature_kd",
                        "args": {"student_channels": [8], "teacher_channels": [16], "spatial_dims": 2},
                    },
                },
                "losses": {"adv": {"name": "gan", "weight": 0.1}},
                "optimizers": {
                    "gen": {"models": ["net", "distillers.fkd"], **opt},
                    "disc": {"models": ["d_ct"], **opt},
                },
            },
        ],
    }
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_rows(run: Path, stage: str) -> list[dict]:
    rows = [json.loads(ln) for ln in (run / stage / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["phase"] == "train"]


def test_synthesis_pipeline_on_tiny_heads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mr, ct = write_pair(tmp_path)
    config = tiny_config(tmp_path, mr, ct)
    run = tmp_path / "run"
    main(["run", str(config), "--out", str(run)])

    # the reference: registered once, stored with its transform; the two heads overlap well
    info = json.loads((run / "reference" / "registration.json").read_text())
    assert info["head_dice_mr_vs_registered_ct"] > 0.8
    assert (run / "reference" / "ct_to_mr.h5").exists()
    ref = read_image(run / "reference" / "reference_ct.nii.gz")
    assert ref.shape == read_image(mr).shape and ref.array.max() > 700  # the CT's skull, on the MR grid

    # generators and discriminators trained with their own optimizers; pools checkpointed
    state = load_checkpoint(run / "cc_shape" / "last.pt")
    assert set(state["optimizers"]) == {"gen", "disc"}
    assert {"pool_d_ct", "pool_d_mr", "pool_d_shape"} <= set(state["states"])
    assert state["states"]["pool_d_shape"]["count"] > 0
    rows = train_rows(run, "cc_shape")
    assert rows[-1]["loss_cycle_ct"] < rows[0]["loss_cycle_ct"]  # the cycle reconstruction was learnt
    keys = ("loss_cycle_mr", "loss_cc", "loss_mask", "loss_shape_adv", "loss_identity")
    assert all(k in rows[0] for k in keys)
    assert state["states"]["ema.net"]["updates"] == state["step"]  # the averaged generator follows every step
    student_rows = train_rows(run, "student")
    kd = [r["loss_kd"] for r in student_rows]
    assert kd[-1] < kd[0]  # the student moved towards the teacher
    assert "loss_fkd" in student_rows[0]  # feature KD on the hooked residual trunks, adapters trained
    assert "distillers.fkd" in load_checkpoint(run / "student" / "last.pt")["models"]

    # CT training slices never include the levels of held-out MR slices
    splits = json.loads((run / "splits.json").read_text())
    assert splits["test"] and any(s.startswith("ct:") for s in splits["train"])

    result = json.loads((run / "eval" / "metrics.json").read_text())
    cases = result["cases"]
    assert {"cc_shape", "student", "baseline: water in head"} <= set(cases)
    row = cases["student"]
    assert 0 < row["n_slices"] <= len(splits["test"])
    for key in ("head_mae_hu", "head_rmse_hu", "head_psnr_db", "head_ssim", "bone_mae_hu", "soft_mae_hu"):
        assert np.isfinite(row[key])
    assert "another person, not the same patient" in result["note"]
    table = result["tables"][0]  # the report's table: head MAE first, one row per model and baseline
    assert table["header"][:3] == ["model", "n slices", "head_mae_hu"] and len(table["rows"]) == len(cases)
    assert (run / "eval" / "synthesis_grid.png").stat().st_size > 5_000

    # predict: a whole MR in, synthetic CT in HU out on the MR's grid
    out = tmp_path / "sct.nii.gz"
    main(["predict", str(run), str(mr), "--out", str(out)])
    sct, src = read_image(out), read_image(mr)
    assert sct.shape == src.shape and np.allclose(sct.affine, src.affine)
    assert sct.array.dtype == np.float32 and -1000.5 <= sct.array.min() and sct.array.max() <= 2000.5

    # bad inputs: one line each
    flat = tmp_path / "flat.nii.gz"
    write_image(Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), flat)
    for bad, message in ((ct, "looks like a CT in HU"), (flat, "the volume is empty")):
        capsys.readouterr()
        with pytest.raises(SystemExit):
            main(["predict", str(run), str(bad), "--out", str(tmp_path / "bad.nii.gz")])
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
