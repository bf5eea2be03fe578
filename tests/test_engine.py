"""The training engine: exact resume, DDP equivalence, safe checkpoints, config errors."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from medistill.config import apply_overrides, validate_config
from medistill.engine.checkpoint import load_checkpoint, save_checkpoint
from medistill.engine.data import GlobalBatchSampler
from medistill.engine.stages import StageRunner
from medistill.errors import MedistillError
from medistill.tasks.base import make_task
from toy_tasks import GAN_STAGE, toy_cfg


def fit(cfg, run_dir: Path, **kw) -> dict:
    """Train the toy experiment's only stage in ``run_dir`` (as ``medistill train`` does)."""
    return StageRunner(cfg, run_dir, make_task).run(**kw)


def losses(run: Path, stage: str = "model", key: str = "loss") -> list[float]:
    rows = [json.loads(ln) for ln in (run / stage / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if r["phase"] == "train"]


def test_resume_reproduces_uninterrupted_run(tmp_path: Path) -> None:
    cfg = toy_cfg()
    fit(cfg, tmp_path / "a")
    # "killed" after 7 steps: the last checkpoint is at step 5, steps 6-7 are redone on resume
    fit(cfg, tmp_path / "b", stop_at=7)
    assert load_checkpoint(tmp_path / "b" / "model" / "last.pt")["step"] == 5
    fit(cfg, tmp_path / "b")
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert len(a) == len(b) == 12
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-7)
    wa = load_checkpoint(tmp_path / "a" / "model" / "last.pt")["models"]["net"]
    wb = load_checkpoint(tmp_path / "b" / "model" / "last.pt")["models"]["net"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0)
    assert a[-1] < a[0]  # it learned


def test_best_checkpoint_tracks_validation_metric(tmp_path: Path) -> None:
    fit(toy_cfg(), tmp_path)
    rows = [json.loads(ln) for ln in (tmp_path / "model" / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["mse"] for r in rows if r["phase"] == "val"}
    best = load_checkpoint(tmp_path / "model" / "best.pt")
    assert best["best"]["value"] == pytest.approx(min(val.values()))
    assert best["step"] == min(val, key=val.get)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, run_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    fit(toy_cfg([GAN_STAGE], checkpoint_every=100, val_every=100), Path(run_dir))


def test_two_process_gloo_ddp_with_a_critic_matches_one_process(tmp_path: Path) -> None:
    """Generator and critic both DDP-wrapped (two optimizers): 2 ranks x 4 = 1 process x 8."""
    fit(toy_cfg([GAN_STAGE], checkpoint_every=100, val_every=100), tmp_path / "one")
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / "two")), nprocs=2, join=True)
    one = load_checkpoint(tmp_path / "one" / "gan" / "last.pt")["models"]
    two = load_checkpoint(tmp_path / "two" / "gan" / "last.pt")["models"]
    for model in ("net", "critic"):
        for k in one[model]:
            torch.testing.assert_close(one[model][k], two[model][k], rtol=1e-5, atol=1e-6)
    for key in ("loss", "loss_d"):
        np.testing.assert_allclose(
            losses(tmp_path / "one", "gan", key), losses(tmp_path / "two", "gan", key), rtol=1e-4
        )


def test_sampler_ranks_partition_each_global_batch() -> None:
    full = GlobalBatchSampler(10, 4, seed=3)
    r0 = GlobalBatchSampler(10, 4, seed=3, rank=0, world_size=2)
    r1 = GlobalBatchSampler(10, 4, seed=3, rank=1, world_size=2)
    for (a, b, c), _ in zip(zip(full, r0, r1, strict=False), range(6), strict=False):
        assert a == b + c
    resumed = GlobalBatchSampler(10, 4, seed=3, start_step=4)
    assert next(iter(resumed)) == full.global_keys(4)
    with pytest.raises(ValueError, match="divisible"):
        GlobalBatchSampler(10, 3, seed=0, world_size=2)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoint_with_pickled_object_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"models": {}, "payload": Evil()}, path)
    with pytest.raises(MedistillError, match="refused to load"):
        load_checkpoint(path)
    save_checkpoint({"w": torch.ones(2), "step": 3}, tmp_path / "ok.pt")
    assert load_checkpoint(tmp_path / "ok.pt")["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.pt", "ok.pt"]  # no temp files left


def test_config_errors_name_the_key_and_suggest() -> None:
    raw = {"task": "toy_regression", "train": {"lrr": 0.1}}
    staged = {
        "task": "toy_regression",
        "stages": [{"name": "a", "models": {"net": {"name": "toy_mlp", "agrs": {}}}}],
    }
    with pytest.raises(
        MedistillError, match=r"stages\.0\.models\.net\.agrs: unknown key \(did you mean args\?\)"
    ):
        validate_config(staged, "exp.yaml")
    with pytest.raises(MedistillError, match=r"train\.lrr: unknown key \(did you mean lr\?\)"):
        validate_config(raw, "exp.yaml")
    with pytest.raises(MedistillError, match=r"train\.steps: Input should be greater than 0"):
        validate_config({"task": "toy_regression", "train": {"steps": 0}}, "exp.yaml")
    with pytest.raises(MedistillError, match="unknown task 'toy_regresion'.*did you mean toy_regression"):
        validate_config({"task": "toy_regresion"}, "exp.yaml")
    cfg = validate_config(apply_overrides({"task": "toy_regression"}, ["train.lr=3e-4", "data.n=5"]))
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.data.n == 5


def test_cpu_bf16_runs_forward_passes_in_bfloat16_or_is_refused(tmp_path: Path, monkeypatch) -> None:
    """``train.cpu_bf16``: the step's forward runs in bfloat16 (losses in fp32) and the run still learns;
    on a CPU without native bfloat16 it is refused before training, in one line naming the field."""
    from medistill.engine import trainer
    from medistill.engine.trainer import StepContext

    ctx = StepContext({}, {}, torch.device("cpu"), cpu_bf16=True)
    with ctx.autocast():
        y = torch.nn.functional.linear(torch.randn(2, 3), torch.randn(4, 3))
    assert y.dtype == torch.bfloat16
    plain = StepContext({}, {}, torch.device("cpu"))
    with plain.autocast():
        assert torch.nn.functional.linear(torch.randn(2, 3), torch.randn(4, 3)).dtype == torch.float32

    cfg = toy_cfg(steps=30, cpu_bf16=True)
    if trainer.cpu_has_bf16():
        fit(cfg, tmp_path / "bf16")
        curve = losses(tmp_path / "bf16")
        assert curve[-1] < 0.5 * curve[0]
    monkeypatch.setattr(trainer, "cpu_has_bf16", lambda: False)
    with pytest.raises(MedistillError, match="train.cpu_bf16: this CPU has no native bfloat16"):
        fit(cfg, tmp_path / "refused")
    fit(toy_cfg(steps=4, cpu_bf16="auto"), tmp_path / "auto")  # 'auto' falls back to float32 there
