"""Instance optimisation (``refine``): a known translation is recovered in network-grid voxels whether the
optimisation runs on the network grid or on a smaller one (the unit conversion of ``refine.size``)."""

from __future__ import annotations

import pytest
import torch

from medistill.losses.regularization import GradientSmoothness
from medistill.losses.similarity import PearsonLoss
from medistill.nets.registration import warp
from medistill.tasks.registration_refine import RegRefine, refine_displacement

SHIFT = (1.5, -2.0, 1.0)  # voxels of the 25^3 grid, along array axes 0, 1, 2


def _pair() -> tuple[torch.Tensor, torch.Tensor]:
    n = 25
    g = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32)] * 3, indexing="ij"))
    centre = torch.tensor([12.0, 11.0, 13.0]).view(3, 1, 1, 1)

    def blobs(c: torch.Tensor) -> torch.Tensor:
        d2 = ((g - c) ** 2 * torch.tensor([1.0, 1.5, 0.7]).view(3, 1, 1, 1)).sum(0)
        return (torch.exp(-d2 / 30) + 0.5 * torch.exp(-((g[0] - c[0] - 4) ** 2 + (g[1] - c[1]) ** 2) / 8))[
            None, None
        ]

    fixed = blobs(centre)
    moving = blobs(centre + torch.tensor(SHIFT).view(3, 1, 1, 1))  # moving(x + SHIFT) = fixed(x)
    return fixed, moving


@pytest.mark.parametrize("size", [None, 13])
def test_known_translation_is_recovered_in_network_voxels(size: int | None) -> None:
    fixed, moving = _pair()
    sim, smooth = PearsonLoss(), GradientSmoothness()
    zero = torch.zeros(1, 3, 25, 25, 25)
    cfg = RegRefine(steps=80, lr=0.3, grid=5, size=size)
    u = refine_displacement(fixed, moving, zero, lambda f, w, v: sim(f, w) + smooth(v), cfg)
    assert u.shape == zero.shape
    inner = u[:, :, 6:19, 6:19, 6:19].mean(dim=(2, 3, 4))[0]
    assert torch.allclose(inner, torch.tensor(SHIFT), atol=0.3), inner
    before = sim(fixed, moving)
    assert float(sim(fixed, warp(moving, u))) < 0.1 * float(before)


def test_zero_steps_is_the_start_and_the_start_is_not_changed() -> None:
    fixed, moving = _pair()
    u0 = torch.full((1, 3, 25, 25, 25), 0.25)
    keep = u0.clone()
    assert refine_displacement(fixed, moving, u0, lambda f, w, v: w.sum(), RegRefine(steps=0)) is u0
    refine_displacement(fixed, moving, u0, lambda f, w, v: (w - f).pow(2).mean(), RegRefine(steps=3, size=13))
    assert torch.equal(u0, keep)
