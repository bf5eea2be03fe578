"""Multi-Scale Knowledge Distillation (MSKD) of Zhao et al., IEEE TMI 2023 (spec C.5.3), done right.

At every deep-supervision scale the student's soft prediction is pulled towards the teacher's:
``L = sum_s w_s * T^2 * mean_n KL(softmax(z_T/T) || softmax(z_S/T))``. The released term ("FNKD") gives
**no gradient**: its input is the teacher's no-grad output and its target the student's background
probability cast to ``long`` (all zeros), with a whole-tensor feature norm as temperature (~1e3, so the
teacher distribution is uniform). We implement the figure's intent with a fixed, configurable temperature
(spec option B) and the student's log-probabilities carrying the gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from medistill.distill.kd import KD_MODES, Outputs, kd_divergence, paired_scales, weighted_over_scales
from medistill.registry import DISTILLERS


@DISTILLERS.register("mskd")
class MSKD(nn.Module):
    """Soft-target KD at each scale, weights ``w_s`` (default [0.4, 0.2, 0.2, 0.2]; full resolution first).

    Args:
        temperature: softening temperature ``T`` (the loss is scaled by ``T^2``).
        scale_weights: per-scale weights, finest first.
        mode: "softmax" (multi-class) or "sigmoid" (multi-label); see
            :func:`~medistill.distill.kd.kd_divergence`.

    ``loss(student_out, teacher_out)``: logits ``B K *S`` or lists finest first, with as many scales on
    both sides (refused otherwise), each pair of equal shape.
    """

    multiscale = True  # takes every deep-supervision output (the stage runner checks the pairing)

    def __init__(
        self, temperature: float = 1.0, scale_weights: Sequence[float] | None = None, mode: str = "softmax"
    ) -> None:
        super().__init__()
        if mode not in KD_MODES:
            raise ValueError(f"KD mode {mode!r} is not one of {KD_MODES}")
        self.temperature = temperature
        self.scale_weights = scale_weights
        self.mode = mode

    def forward(self, student_out: Outputs, teacher_out: Outputs, **_extra: Any) -> torch.Tensor:
        return weighted_over_scales(
            paired_scales(student_out, teacher_out),
            lambda s, t: kd_divergence(s, t, self.temperature, self.mode),
            self.scale_weights,
        )
