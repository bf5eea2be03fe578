"""Exponential moving average of a model's weights (``stages[].ema``).

Why: an adversarially trained generator moves every step (its critic keeps changing what "real" means),
so the weights at any one step carry that step's oscillation; the average over the last ~1/(1-decay)
steps is a smoother, better generator at no training cost (Yazici et al., ICLR 2019; the averaged
generators of Karras et al.). The engine validates the average and writes it to ``best.pt``; ``last.pt``
keeps the raw weights (what the optimizer continues from) and the average (as registered state), so a
resumed stage continues both exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class ModelEMA:
    """``shadow <- d * shadow + (1 - d) * weights`` after every step, with ``d = min(decay, (1+t)/(10+t))``
    so the first steps are not pinned to the initialisation; integer buffers are copied."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = float(decay)
        self.updates = 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in model.state_dict().items():
            s = self.shadow[k]
            if s.dtype.is_floating_point:
                s.lerp_(v.detach(), 1.0 - d)
            else:
                s.copy_(v)

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """``model`` with the averaged weights inside the block, its own weights restored after."""
        own = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.shadow)
        try:
            yield model
        finally:
            model.load_state_dict(own)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.updates = float(state["decay"]), int(state["updates"])
        self.shadow = {k: v.clone() for k, v in state["shadow"].items()}
