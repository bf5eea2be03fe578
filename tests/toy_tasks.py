"""A toy task for the engine's tests: 1-D regression with a teacher, a distilled student and a critic.

``y = tanh(x . w) + 0.1 x_0^2`` from 8 inputs. A stage with a model ``critic`` trains the ``net`` as a
generator against a conditional critic (LSGAN, optionally through an image pool); any other stage is
supervised (losses on ``net``'s output, distillers against frozen teachers).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from medistill.config import ExperimentConfig, StrictModel
from medistill.engine.data import KeyedDataset
from medistill.engine.pool import ImagePool
from medistill.registry import NETS, TASKS
from medistill.tasks.base import Task
from medistill.tasks.steps import supervised_step


class ToyData(StrictModel):
    n: int = 64
    noise: float = 0.05
    pool: int = 0
    train_prefix: str = "s"


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


@NETS.register("toy_mlp")
class ToyMLP(nn.Module):
    def __init__(self, in_features: int = 8, hidden: int = 16, out_features: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_features, hidden), nn.Tanh(), nn.Linear(hidden, out_features))

    def forward(self, x: torch.Tensor, scales: bool = False) -> torch.Tensor | list[torch.Tensor]:
        y = self.body(x)
        return [y] if scales else y


@TASKS.register("toy_regression")
class ToyTask(Task):
    Config = ToyConfig
    val_metric = "mse"
    val_mode = "min"

    def build_data(self):
        return ToySet(self.cfg.data.n, self.cfg.data.noise, 0), ToySet(16, 0.0, 1)

    def splits(self) -> dict[str, list[str]]:
        p = self.cfg.data.train_prefix
        return {"train": [f"{p}{i}" for i in range(self.cfg.data.n)], "val": ["v0"], "test": ["t0", "t1"]}

    def setup_stage(self, ctx) -> None:
        if "critic" in ctx.models:
            ctx.add_state("pool", ImagePool(self.cfg.data.pool, seed=self.cfg.seed))

    def training_step(self, batch, ctx):
        x, y = batch["x"], batch["y"]
        if "critic" not in ctx.models:
            return supervised_step(ctx, x, y)
        adv, rec = ctx.losses["adv"], ctx.losses["rec"]
        fake = ctx.models["net"](x)
        with ctx.frozen_params("critic") as critic:
            g_adv = adv.fn.generator(critic(torch.cat([x, fake], 1)))
            g_rec = rec(fake, y)
            ctx.optimize("gen", adv.weight * g_adv + rec.weight * g_rec)
        fakes = ctx.states["pool"].query(torch.cat([x, fake.detach()], 1))
        scores = ctx.models["critic"](torch.cat([torch.cat([x, y], 1), fakes]))
        d_loss = adv.fn.critic(scores[: len(x)], scores[len(x) :])
        ctx.optimize("critic", d_loss)
        return {
            "loss": float(g_rec.detach()),
            "loss_g": float(g_adv.detach()),
            "loss_d": float(d_loss.detach()),
        }

    def validate(self, ctx, loader):
        errs = [torch.nn.functional.mse_loss(ctx.models["net"](b["x"]), b["y"]).item() for b in loader]
        return {"mse": float(np.mean(errs))}


TRAIN = {
    "steps": 12,
    "batch_size": 8,
    "lr": 0.01,
    "log_every": 1,
    "val_every": 4,
    "checkpoint_every": 5,
    "progress": False,
}

SUPERVISED_STAGE = {
    "name": "model",
    "models": {"net": {"name": "toy_mlp"}},
    "losses": {"mse": {"name": "mse"}},
}

TEACHER_STUDENT = [
    {
        "name": "teacher",
        "models": {"net": {"name": "toy_mlp", "args": {"hidden": 32}}},
        "losses": {"mse": {"name": "mse"}},
    },
    {
        "name": "student",
        "models": {"net": {"name": "toy_mlp", "args": {"hidden": 4}}},
        "frozen": {"teacher": {"stage": "teacher"}},
        "losses": {"mse": {"name": "mse"}},
        "distillers": {"kd": {"name": "output_match", "weight": 0.5, "args": {"norm": "l2"}}},
    },
]

GAN_STAGE = {
    "name": "gan",
    "models": {"net": {"name": "toy_mlp"}, "critic": {"name": "toy_mlp", "args": {"in_features": 9}}},
    "losses": {"adv": {"name": "gan", "weight": 0.1, "args": {"mode": "lsgan"}}, "rec": {"name": "mse"}},
    "optimizers": {
        "gen": {"models": ["net"], "type": "adam", "lr": 0.01, "betas": [0.5, 0.999], "schedule": "linear"},
        "critic": {
            "models": ["critic"],
            "type": "adam",
            "lr": 0.005,
            "betas": [0.5, 0.999],
            "schedule": "cosine",
        },
    },
}


def toy_cfg(stages: list[dict] | None = None, data: dict | None = None, **train) -> ToyConfig:
    return ToyConfig.model_validate(
        {
            "task": "toy_regression",
            "seed": 7,
            "data": data or {},
            "train": TRAIN | train,
            "stages": stages or [SUPERVISED_STAGE],
        }
    )
