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

from medistill.config import ExperimentConfig, StrictModel, apply_overrides, validate_config
from medistill.engine.checkpoint import load_checkpoint, save_checkpoint
from medistill.engine.data import GlobalBatchSampler, KeyedDataset
from medistill.engine.trainer import Trainer
from medistill.errors import MedistillError
from medistill.registry import TASKS
from medistill.tasks.base import Task


class ToyData(StrictModel):
    n: int = 64
    noise: float = 0.05


class ToyConfig(ExperimentConfig):
    task: str = "toy_regression"
    data: ToyData = ToyData()


class ToySet(KeyedDataset):
    def __init__(self, n: int, noise: float, offset: int) -> None:
        g = np.random.default_rng(1234 + offset)
        self.x = g.normal(size=(n, 8)).astype(np.float32)
        w = np.linspace(-1, 1, 8, dtype=np.float32)
        self.y = (np.tanh(self.x @ w) + 0.1 * self.x[:, 0] ** 2)[:, None].astype(np.float32)
        self.noise = noise

    def __len__(self) -> int:
        return len(self.x)

    def get(self, index: int, rng: np.random.Generator | None) -> dict[str, torch.Tensor]:
        x = self.x[index]
        if rng is not None:  # a seeded augmentation, so resume must reproduce it
            x = x + rng.normal(scale=self.noise, size=x.shape).astype(np.float32)
        return {"x": torch.from_numpy(x), "y": torch.from_numpy(self.y[index])}


@TASKS.register("toy_regression")
class ToyTask(Task):
    Config = ToyConfig
    val_metric = "mse"
    val_mode = "min"

    def build_data(self):
        return ToySet(self.cfg.data.n, self.cfg.data.noise, 0), ToySet(16, 0.0, 1)

    def build_models(self):
        return {"net": torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))}

    def training_step(self, batch, ctx):
        loss = torch.nn.functional.mse_loss(ctx.models["net"](batch["x"]), batch["y"])
        ctx.optimize("main", loss)
        return {"loss": loss.item()}

    def validate(self, ctx, loader):
        errs = [torch.nn.functional.mse_loss(ctx.models["net"](b["x"]), b["y"]).item() for b in loader]
        return {"mse": float(np.mean(errs))}


def toy_cfg(**train) -> ToyConfig:
    base = {
        "steps": 12,
        "batch_size": 8,
        "lr": 0.01,
        "log_every": 1,
        "val_every": 4,
        "checkpoint_every": 5,
        "progress": False,
    }
    return ToyConfig(task="toy_regression", seed=7, train={**base, **train})


def losses(run: Path) -> list[float]:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["phase"] == "train"]


def test_resume_reproduces_uninterrupted_run(tmp_path: Path) -> None:
    cfg = toy_cfg()
    Trainer(ToyTask(cfg, tmp_path / "a"), tmp_path / "a").fit()
    # "killed" after 7 steps: the last checkpoint is at step 5, steps 6-7 are redone on resume
    Trainer(ToyTask(cfg, tmp_path / "b"), tmp_path / "b").fit(stop_at=7)
    assert load_checkpoint(tmp_path / "b" / "last.pt")["step"] == 5
    Trainer(ToyTask(cfg, tmp_path / "b"), tmp_path / "b").fit()
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert len(a) == len(b) == 12
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-7)
    wa = load_checkpoint(tmp_path / "a" / "last.pt")["models"]["net"]
    wb = load_checkpoint(tmp_path / "b" / "last.pt")["models"]["net"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0)
    assert a[-1] < a[0]  # it learned


def test_best_checkpoint_tracks_validation_metric(tmp_path: Path) -> None:
    Trainer(ToyTask(toy_cfg(), tmp_path), tmp_path).fit()
    rows = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["mse"] for r in rows if r["phase"] == "val"}
    best = load_checkpoint(tmp_path / "best.pt")
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
    cfg = toy_cfg(checkpoint_every=100, val_every=100)
    Trainer(ToyTask(cfg, run_dir), run_dir).fit()


def test_two_process_gloo_ddp_matches_one_process(tmp_path: Path) -> None:
    cfg = toy_cfg(checkpoint_every=100, val_every=100)
    Trainer(ToyTask(cfg, tmp_path / "one"), tmp_path / "one").fit()
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / "two")), nprocs=2, join=True)
    w1 = load_checkpoint(tmp_path / "one" / "last.pt")["models"]["net"]
    w2 = load_checkpoint(tmp_path / "two" / "last.pt")["models"]["net"]
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(losses(tmp_path / "one"), losses(tmp_path / "two"), rtol=1e-5)


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
    with pytest.raises(MedistillError, match=r"train\.lrr: unknown key \(did you mean lr\?\)"):
        validate_config(raw, "exp.yaml")
    with pytest.raises(MedistillError, match=r"train\.steps: Input should be greater than 0"):
        validate_config({"task": "toy_regression", "train": {"steps": 0}}, "exp.yaml")
    with pytest.raises(MedistillError, match="unknown task 'toy_regresion'.*did you mean toy_regression"):
        validate_config({"task": "toy_regresion"}, "exp.yaml")
    cfg = validate_config(apply_overrides({"task": "toy_regression"}, ["train.lr=3e-4", "data.n=5"]))
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.data.n == 5
