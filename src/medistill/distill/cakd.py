"""Class-Affinity Knowledge Distillation (CAKD) of Zhao et al., "MSKD: Structured knowledge distillation for
efficient medical image segmentation", IEEE TMI 2023 (spec C.5.2).

Per sample and scale, the class-affinity matrix ``M = Q Q^T`` (``Q = softmax(z)`` reshaped ``K x N``)
holds soft class volumes on its diagonal and soft co-activations off it; student and teacher matrices
are compared column by column with cosine similarity. Deviations: the released code hard-codes batch
size 2 (crashes for 1, ignores samples beyond 2); we vectorise over any batch. We report
``mean(1 - cos)`` in ``[0, 1]`` (zero when equal) instead of ``-mean(cos)`` in ``[-1, 0]``: the same
gradient, a readable value. An optional temperature (default 1, as released) softens ``Q``.

CAKD is defined for softmax outputs; for a multi-label sigmoid head (``activation="sigmoid"``) it is
applied to the per-pixel distribution over "class k" (sigmoid probabilities) plus "no class" (their joint
complement), normalised (:func:`multilabel_affinity_logits`), which equals the softmax case when the
classes are exclusive.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from medistill.distill.kd import Outputs, check_same_shape, paired_scales, weighted_over_scales
from medistill.registry import DISTILLERS

ACTIVATIONS = ("softmax", "sigmoid")


def multilabel_affinity_logits(logits: torch.Tensor) -> torch.Tensor:
    """``B K *S`` sigmoid logits -> ``B K+1 *S`` logits whose softmax is ``(p_1..p_K, prod(1 - p_k)) / Z``:
    the sigmoid probabilities and the probability of no label, normalised per pixel."""
    none = F.logsigmoid(-logits.float()).sum(dim=1, keepdim=True)
    return torch.cat([F.logsigmoid(logits.float()), none], dim=1)


def class_affinity(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``B K *S`` logits -> ``B K K`` affinity ``softmax(z/T) softmax(z/T)^T`` (fp32, autocast off)."""
    with torch.autocast(device_type=logits.device.type, enabled=False):
        q = F.softmax(logits.float().flatten(2) / temperature, dim=1)  # B K N
        return torch.bmm(q, q.transpose(1, 2))


def cakd_divergence(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """``mean_{b, j} (1 - cos(M_S[b][:, j], M_T[b][:, j]))`` for one scale; logits ``B K *S``."""
    check_same_shape(student_logits, teacher_logits, "CAKD")
    ms = class_affinity(student_logits, temperature)
    mt = class_affinity(teacher_logits.detach(), temperature)
    return (1 - F.cosine_similarity(ms, mt, dim=1, eps=1e-8)).mean()  # dim=1: down each column j


@DISTILLERS.register("cakd")
class CAKD(nn.Module):
    """CAKD summed over deep-supervision scales with weights ``w_s`` (default [0.4, 0.2, 0.2, 0.2]).

    ``loss(student_out, teacher_out)``: logits or lists finest first, with as many scales on both sides
    (refused otherwise), each pair of equal shape. ``activation``: "softmax" (multi-class logits) or
    "sigmoid" (multi-label logits, see the module docstring).
    """

    multiscale = True  # takes every deep-supervision output (the stage runner checks the pairing)

    def __init__(
        self,
        temperature: float = 1.0,
        scale_weights: Sequence[float] | None = None,
        activation: str = "softmax",
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"CAKD activation {activation!r} is not one of {ACTIVATIONS}")
        self.temperature = temperature
        self.scale_weights = scale_weights
        self.activation = activation

    def forward(self, student_out: Outputs, teacher_out: Outputs, **_extra: Any) -> torch.Tensor:
        prep = multilabel_affinity_logits if self.activation == "sigmoid" else (lambda z: z)
        return weighted_over_scales(
            paired_scales(student_out, teacher_out),
            lambda s, t: cakd_divergence(prep(s), prep(t), self.temperature),
            self.scale_weights,
        )
