"""Declarative stages: teacher -> KD student from YAML, critics as models that resume exactly, validation
before any work, frozen teachers that have not seen the test subjects."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from medistill.cli import main
from medistill.engine.checkpoint import load_checkpoint
from medistill.engine.pool import ImagePool
from medistill.engine.stages import StageRunner
from medistill.engine.trainer import lr_lambda
from medistill.errors import MedistillError
from medistill.tasks.base import make_task
from toy_tasks import GAN_STAGE, SUPERVISED_STAGE, TEACHER_STUDENT, TRAIN, toy_cfg


def records(run: Path, stage: str, phase: str = "train") -> list[dict]:
    rows = [json.loads(ln) for ln in (run / stage / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["phase"] == phase]


def write_yaml(path: Path, stages: list[dict], **train) -> Path:
    path.write_text(
        yaml.safe_dump({"task": "toy_regression", "seed": 3, "train": TRAIN | train, "stages": stages})
    )
    return path


def test_teacher_then_kd_student_from_yaml(tmp_path: Path, capsys) -> None:
    config = write_yaml(tmp_path / "exp.yaml", TEACHER_STUDENT, steps=20)
    run = tmp_path / "run"
    main(["train", str(config), "--out", str(run)])
    for stage in ("teacher", "student"):
        assert (run / stage / "best.pt").exists() and (run / stage / "last.pt").exists()
    splits = json.loads((run / "splits.json").read_text())
    assert splits["test"] == ["t0", "t1"]
    student = load_checkpoint(run / "student" / "last.pt")
    assert student["train_subjects"] == splits["train"] and len(student["train_hash"]) == 16
    assert student["model_specs"]["net"]["args"] == {"hidden": 4}
    kd = [r["loss_kd"] for r in records(run, "student")]
    assert len(kd) == 20 and kd[-1] < kd[0]  # the student moved towards the frozen teacher
    # the teacher is the teacher stage's best weights, unchanged by the student stage
    teacher = load_checkpoint(run / "teacher" / "best.pt")["models"]["net"]
    task = make_task(toy_cfg(TEACHER_STUDENT), run)
    frozen = task.runner._frozen_models(task.runner.stage("student"))["teacher"]
    for k, v in frozen.model.state_dict().items():
        torch.testing.assert_close(v, teacher[k], rtol=0, atol=0)
    assert not any(p.requires_grad for p in frozen.parameters()) and not frozen.training

    # finished stages are skipped: running again changes nothing
    stamp = (run / "student" / "last.pt").stat().st_mtime_ns
    main(["train", str(config), "--out", str(run)])
    assert (run / "student" / "last.pt").stat().st_mtime_ns == stamp


def test_one_stage_needs_its_inputs_trained(tmp_path: Path, capsys) -> None:
    config = write_yaml(tmp_path / "exp.yaml", TEACHER_STUDENT)
    with pytest.raises(SystemExit):
        main(["train", str(config), "--out", str(tmp_path / "run"), "--stage", "student"])
    err = capsys.readouterr().err
    assert "stages.student.frozen.teacher" in err and "train stage 'teacher' first" in err
    main(["train", str(config), "--out", str(tmp_path / "run"), "--stage", "teacher"])
    assert (tmp_path / "run" / "teacher" / "best.pt").exists() and not (tmp_path / "run" / "student").exists()


def test_generator_and_critic_resume_exactly(tmp_path: Path) -> None:
    """Two optimizers with their own schedules, an image pool: killed mid-stage, resumed, identical."""
    cfg = toy_cfg([GAN_STAGE], data={"pool": 6}, steps=14, checkpoint_every=4)
    StageRunner(cfg, tmp_path / "a", make_task).run()
    StageRunner(cfg, tmp_path / "b", make_task).run(stop_at=10)  # last checkpoint at step 8
    state = load_checkpoint(tmp_path / "b" / "gan" / "last.pt")
    assert state["step"] == 8 and set(state["optimizers"]) == {"gen", "critic"}
    assert state["states"]["pool"]["count"] == 6  # the pool's content is checkpointed
    StageRunner(cfg, tmp_path / "b", make_task).run()
    for key in ("loss", "loss_g", "loss_d", "lr_gen", "lr_critic"):
        a = [r[key] for r in records(tmp_path / "a", "gan")]
        b = [r[key] for r in records(tmp_path / "b", "gan")]
        assert len(a) == len(b) == 14
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-7, err_msg=key)
    wa = load_checkpoint(tmp_path / "a" / "gan" / "last.pt")["models"]
    wb = load_checkpoint(tmp_path / "b" / "gan" / "last.pt")["models"]
    for model in ("net", "critic"):
        for k in wa[model]:
            torch.testing.assert_close(wa[model][k], wb[model][k], rtol=0, atol=0)
    lrs = [r["lr_gen"] for r in records(tmp_path / "a", "gan")]
    assert lrs[0] == pytest.approx(0.01) and lrs[-1] < 0.002  # its own (linear) schedule


def test_critic_is_frozen_during_the_generator_step(tmp_path: Path) -> None:
    cfg = toy_cfg([GAN_STAGE], steps=1)
    runner = StageRunner(cfg, tmp_path, make_task)
    from medistill.engine.trainer import Trainer

    trainer = Trainer(runner.task(cfg.stages[0]), tmp_path, cfg.stages[0])
    _, ctx, _ = trainer.build()
    x = torch.randn(4, 9, requires_grad=True)  # stands for the generator's output
    with ctx.frozen_params("critic") as critic:
        assert not any(p.requires_grad for p in critic.parameters())
        critic(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # the loss flows through the critic ...
    assert all(p.grad is None for p in ctx.models["critic"].parameters())  # ... but the critic gets none
    assert all(p.requires_grad for p in ctx.models["critic"].parameters())  # restored


def test_misspelled_distiller_argument_fails_before_training(tmp_path: Path) -> None:
    stages = [
        TEACHER_STUDENT[0],
        TEACHER_STUDENT[1] | {"distillers": {"kd": {"name": "mskd", "args": {"temprature": 2}}}},
    ]
    with pytest.raises(
        MedistillError,
        match=r"stages\.student\.distillers\.kd\.args\.temprature: unknown argument "
        r"of distiller 'mskd' \(did you mean temperature\?\)",
    ):
        StageRunner(toy_cfg(stages), tmp_path, make_task).run()
    assert not (tmp_path / "teacher").exists()  # nothing trained


def test_mismatched_multiscale_pairing_fails_before_training(tmp_path: Path) -> None:
    unet = {"spatial_dims": 2, "in_channels": 1, "out_channels": 3, "deep_supervision": True}
    stages = [
        {
            "name": "teacher",
            "models": {"net": {"name": "unet", "args": unet | {"features": [4, 8, 16, 32]}}},
            "losses": {"seg": {"name": "deep_supervision"}},
        },
        {
            "name": "student",
            "models": {"net": {"name": "unet", "args": unet | {"features": [4, 8, 16]}}},
            "frozen": {"teacher": {"stage": "teacher", "scales": True}},
            "distillers": {"ms": {"name": "mskd"}},
        },
    ]
    with pytest.raises(
        MedistillError,
        match=r"stages\.student\.distillers\.ms: mskd pairs scales one to one, but "
        r"the student unet gives 2 scale\(s\) and the teacher unet 3",
    ):
        StageRunner(toy_cfg(stages), tmp_path, make_task).run()
    assert not (tmp_path / "teacher").exists()
    with pytest.raises(ValueError, match="student gives 2 scale"):  # and the distiller itself refuses
        from medistill.distill import MSKD

        MSKD()([torch.zeros(1, 3, 4, 4)] * 2, [torch.zeros(1, 3, 4, 4)] * 3)


def test_frozen_teacher_trained_on_test_subjects_is_refused(tmp_path: Path) -> None:
    # a teacher trained in another run whose training subjects are t0..t63: t0 and t1 are our test subjects
    StageRunner(toy_cfg([SUPERVISED_STAGE], data={"train_prefix": "t"}), tmp_path / "other", make_task).run()
    leaked = tmp_path / "other" / "model" / "best.pt"
    stages = [
        {
            "name": "student",
            "models": {"net": {"name": "toy_mlp", "args": {"hidden": 4}}},
            "frozen": {"teacher": {"checkpoint": str(leaked)}},
            "distillers": {"kd": {"name": "output_match"}},
        }
    ]
    with pytest.raises(MedistillError, match=r"trained on 2 of this run's test subjects \(t0, t1\)"):
        StageRunner(toy_cfg(stages), tmp_path / "run", make_task).run()
    assert not (tmp_path / "run" / "student").exists()
    clean = tmp_path / "clean"
    StageRunner(toy_cfg([SUPERVISED_STAGE]), clean, make_task).run()
    stages[0]["frozen"]["teacher"]["checkpoint"] = str(clean / "model" / "best.pt")
    StageRunner(toy_cfg(stages), tmp_path / "run", make_task).run()  # a teacher of our own split is fine
    assert (tmp_path / "run" / "student" / "best.pt").exists()


def test_raising_steps_of_a_scheduled_stage_is_refused(tmp_path: Path) -> None:
    StageRunner(toy_cfg(steps=8, lr_schedule="cosine"), tmp_path, make_task).run()
    with pytest.raises(MedistillError, match="would restart the schedule"):
        StageRunner(toy_cfg(steps=12, lr_schedule="cosine"), tmp_path, make_task).run()
    StageRunner(toy_cfg(steps=8, lr_schedule="constant"), tmp_path / "c", make_task).run()
    StageRunner(
        toy_cfg(steps=12, lr_schedule="constant"), tmp_path / "c", make_task
    ).run()  # constant: continues
    assert load_checkpoint(tmp_path / "c" / "model" / "last.pt")["step"] == 12


def test_image_pool_mixes_history_and_resumes() -> None:
    pool = ImagePool(4, seed=0)
    first = pool.query(torch.arange(4.0)[:, None])
    assert torch.equal(first, torch.arange(4.0)[:, None])  # filling: returned as given
    clone = ImagePool(4, seed=99)
    clone.load_state_dict(pool.state_dict())
    new = torch.arange(10.0, 30.0)[:, None]
    out_a, out_b = pool.query(new), clone.query(new)
    assert torch.equal(out_a, out_b)  # same content, same random state: same draws
    returned = out_a.flatten().tolist()
    assert set(returned) & {0.0, 1.0, 2.0, 3.0}  # some earlier samples came back ...
    assert 0 < sum(v >= 10 for v in returned) < 20  # ... in place of some new ones
    assert set(pool.images.flatten().tolist()) & set(new.flatten().tolist())  # which the pool now holds
    assert pool.count == 4
    assert torch.equal(ImagePool(0).query(new), new)


def test_linear_schedule_holds_then_decays() -> None:
    f = lr_lambda("linear", total=100, warmup=0, decay_start=0.5)
    assert f(0) == f(49) == 1.0 and f(75) == pytest.approx(0.5) and f(100) == 0.0


def test_an_input_size_the_network_cannot_take_is_refused() -> None:
    from medistill.nets import UNet
    from medistill.tasks.base import require_divisible

    net = UNet(2, 1, 2, features=(4, 8, 16, 32))  # three poolings: multiples of 8
    require_divisible(net, (64, 64), "data.size", "unet")
    with pytest.raises(MedistillError, match=r"data\.size \(60, 60\) must be divisible by \(8, 8\) for unet"):
        require_divisible(net, (60, 60), "data.size", "unet")


def test_stages_may_be_appended_to_a_run_but_not_changed(tmp_path: Path, capsys) -> None:
    """A run grows by stages added at the end (the trained ones untouched); any other change is refused."""
    teacher_only = write_yaml(tmp_path / "a.yaml", TEACHER_STUDENT[:1], steps=6)
    run = tmp_path / "run"
    main(["train", str(teacher_only), "--out", str(run)])
    stamp = (run / "teacher" / "best.pt").stat().st_mtime_ns
    both = write_yaml(tmp_path / "b.yaml", TEACHER_STUDENT, steps=6)
    main(["train", str(both), "--out", str(run)])
    assert (run / "student" / "best.pt").exists()
    assert (run / "teacher" / "best.pt").stat().st_mtime_ns == stamp  # not retrained
    wider = {"net": {"name": "toy_mlp", "args": {"hidden": 16}}}
    changed = [dict(TEACHER_STUDENT[0], models=wider), TEACHER_STUDENT[1]]
    bad_configs = (
        write_yaml(tmp_path / "c.yaml", changed, steps=6),  # a trained stage changed
        write_yaml(tmp_path / "d.yaml", TEACHER_STUDENT, steps=6, lr=0.5),  # a shared setting changed
        write_yaml(tmp_path / "e.yaml", TEACHER_STUDENT[1:], steps=6),  # a trained stage removed
    )
    for bad in bad_configs:
        with pytest.raises(SystemExit):
            main(["train", str(bad), "--out", str(run)])
        assert "already holds a different experiment" in capsys.readouterr().err


def test_model_ema_follows_the_weights_with_its_warm_up_decay() -> None:
    from medistill.engine.ema import ModelEMA

    net = torch.nn.Linear(2, 1)
    torch.nn.init.zeros_(net.weight)
    ema = ModelEMA(net, decay=0.9)
    with torch.no_grad():
        net.weight.fill_(1.0)
    ema.update(net)  # d = min(0.9, 2/11): shadow = 2/11 * 0 + 9/11 * 1
    assert ema.shadow["weight"].flatten().tolist() == pytest.approx([9 / 11] * 2)
    for _ in range(200):
        ema.update(net)
    assert ema.shadow["weight"].flatten().tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    with torch.no_grad():
        net.weight.fill_(5.0)
    with ema.applied(net):
        assert net.weight.flatten().tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    assert net.weight.flatten().tolist() == [5.0, 5.0]  # its own weights are back


def test_stage_ema_is_validated_saved_as_best_and_resumes_exactly(tmp_path: Path) -> None:
    """best.pt holds the averaged generator (not the raw one), last.pt both; a killed and resumed stage
    ends with the same average."""
    stage = GAN_STAGE | {"ema": {"net": 0.8}}
    cfg = toy_cfg([stage], steps=12, checkpoint_every=4, val_every=12)
    StageRunner(cfg, tmp_path / "a", make_task).run()
    last = load_checkpoint(tmp_path / "a" / "gan" / "last.pt")
    best = load_checkpoint(tmp_path / "a" / "gan" / "best.pt")
    shadow = last["states"]["ema.net"]["shadow"]
    for k, v in best["models"]["net"].items():
        torch.testing.assert_close(v, shadow[k], rtol=0, atol=0)
    assert any(not torch.equal(v, last["models"]["net"][k]) for k, v in shadow.items())
    StageRunner(cfg, tmp_path / "b", make_task).run(stop_at=6)  # last checkpoint at step 4
    StageRunner(cfg, tmp_path / "b", make_task).run()
    again = load_checkpoint(tmp_path / "b" / "gan" / "last.pt")["states"]["ema.net"]
    assert again["updates"] == 12
    for k, v in shadow.items():
        torch.testing.assert_close(again["shadow"][k], v, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"ema\.critic2"):
        toy_cfg([GAN_STAGE | {"ema": {"critic2": 0.9}}])
