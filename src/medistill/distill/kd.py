"""Logit and feature knowledge distillation, the multi-scale helpers every distiller shares, and the
:class:`DistillLoss` combiner that a config's ``distill:`` section builds.

Logit KD: Hinton et al., "Distilling the Knowledge in a Neural Network", 2015: ``T^2 * KL(p_T || p_S)``
with temperature-softened distributions, per voxel. For multi-label (sigmoid) heads we use the per-channel
Bernoulli KL instead of a softmax over channels, because the labels are not mutually exclusive.
Feature KD: FitNets (Romero et al., ICLR 2015) with 1x1 adapters from student to teacher widths.

Distiller interface: ``loss(student_out, teacher_out, **extra) -> Tensor`` where each output is logits
``B K *S`` or a deep-supervision list finest first; unknown ``extra`` keys are ignored, so one call feeds
every distiller. Teacher outputs are detached: gradient reaches the student only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from monai.losses import DiceLoss
from monai.networks.layers.factories import Conv
from torch import nn
from torch.nn import functional as F

from medistill.registry import DISTILLERS

Outputs = torch.Tensor | Sequence[torch.Tensor]
KD_MODES = ("softmax", "sigmoid")


def as_scales(out: Outputs | Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """A tensor, list of tensors or ``{name: tensor}`` (insertion order) as a list of tensors."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return list(out.values())
    return list(out)


def paired_scales(student_out: Outputs, teacher_out: Outputs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pairs ``(student, detached teacher)`` scale by scale, finest first.

    Unequal numbers of scales are refused (never silently truncated to the common finest ones): a
    multi-scale distiller would otherwise drop the scales one side lacks without a word.
    """
    s, t = as_scales(student_out), as_scales(teacher_out)
    if len(s) != len(t):
        raise ValueError(
            f"multi-scale KD: the student gives {len(s)} scale(s) and the teacher {len(t)}; they must match"
        )
    return [(si, ti.detach()) for si, ti in zip(s, t, strict=True)]


def default_scale_weights(n: int) -> list[float]:
    """Full resolution counts twice any coarser scale, normalised: n=4 gives [0.4, 0.2, 0.2, 0.2] (C.5.4)."""
    return [w / (n + 1) for w in [2.0] + [1.0] * (n - 1)]


def weighted_over_scales(
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    weights: Sequence[float] | None,
) -> torch.Tensor:
    """``sum_s w_s * fn(student_s, teacher_s)``; weights default to :func:`default_scale_weights`."""
    w = default_scale_weights(len(pairs)) if weights is None else list(weights)
    if len(w) < len(pairs):
        raise ValueError(f"{len(pairs)} scales to distil but only {len(w)} scale weights {tuple(w)}")
    return sum(wi * fn(s, t) for wi, (s, t) in zip(w, pairs, strict=False))  # type: ignore[return-value]


def check_same_shape(student: torch.Tensor, teacher: torch.Tensor, what: str) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"{what}: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} outputs differ"
        )


def kd_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    mode: str = "softmax",
) -> torch.Tensor:
    """``T^2 * mean over B and voxels of KL(p_T || p_S)``, summed over classes.

    ``mode="softmax"``: ``p = softmax(z / T)`` over the channel axis (mutually exclusive classes).
    ``mode="sigmoid"``: ``p = sigmoid(z / T)`` per channel, Bernoulli KL summed over channels (multi-label).
    Logits ``B K *S``; computed in fp32. Zero exactly when the logits agree.
    """
    if mode not in KD_MODES:
        raise ValueError(f"KD mode {mode!r} is not one of {KD_MODES}")
    check_same_shape(student_logits, teacher_logits, "KD")
    zs = student_logits.float() / temperature
    zt = teacher_logits.detach().float() / temperature
    if mode == "softmax":
        log_ps, log_pt = F.log_softmax(zs, dim=1), F.log_softmax(zt, dim=1)
        kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=1)
    else:
        # log p = logsigmoid(z), log(1 - p) = logsigmoid(-z): stable for large |z|
        pt = torch.sigmoid(zt)
        kl = pt * (F.logsigmoid(zt) - F.logsigmoid(zs)) + (1 - pt) * (F.logsigmoid(-zt) - F.logsigmoid(-zs))
        kl = kl.sum(dim=1)
    return kl.mean() * temperature**2


@DISTILLERS.register("kd")
class LogitKD(nn.Module):
    """Hinton logit KD on the full-resolution output (index 0 of a deep-supervision list).

    ``loss(student_out, teacher_out) = T^2 * KL(p_T || p_S)`` per voxel, see :func:`kd_divergence`.
    """

    def __init__(self, temperature: float = 4.0, mode: str = "softmax") -> None:
        super().__init__()
        if mode not in KD_MODES:
            raise ValueError(f"KD mode {mode!r} is not one of {KD_MODES}")
        self.temperature = temperature
        self.mode = mode

    def forward(self, student_out: Outputs, teacher_out: Outputs, **_extra: Any) -> torch.Tensor:
        s, t = as_scales(student_out)[0], as_scales(teacher_out)[0].detach()
        return kd_divergence(s, t, self.temperature, self.mode)


def soft_dice_divergence(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mode: str = "sigmoid", eps: float = 1.0
) -> torch.Tensor:
    """``1 - soft Dice(p_S, p_T)`` per image and class, averaged: every class weighs the same whatever
    its area (``B K *S`` logits; ``p = sigmoid(z)`` per channel, or ``softmax`` over ``K``)."""
    check_same_shape(student_logits, teacher_logits, "soft_dice_kd")
    sigmoid = mode == "sigmoid"
    teacher = teacher_logits.detach().float()
    target = torch.sigmoid(teacher) if sigmoid else torch.softmax(teacher, dim=1)
    # MONAI's Dice per image and channel, with the teacher's probabilities as a soft target
    loss = DiceLoss(sigmoid=sigmoid, softmax=not sigmoid, smooth_nr=eps, smooth_dr=eps)
    return loss(student_logits.float(), target)


@DISTILLERS.register("soft_dice_kd")
class SoftDiceKD(nn.Module):
    """Class-balanced logit KD: the soft Dice between the student's and the teacher's probabilities
    (:func:`soft_dice_divergence`), for heads where per-pixel KL is dominated by large classes and the
    background (a multi-label chest film: lungs cover half the image, clavicles 2 %)."""

    def __init__(self, mode: str = "sigmoid") -> None:
        super().__init__()
        if mode not in KD_MODES:
            raise ValueError(f"KD mode {mode!r} is not one of {KD_MODES}")
        self.mode = mode

    def forward(self, student_out: Outputs, teacher_out: Outputs, **_extra: Any) -> torch.Tensor:
        s, t = as_scales(student_out)[0], as_scales(teacher_out)[0]
        return soft_dice_divergence(s, t, self.mode)


@DISTILLERS.register("output_match")
class OutputMatch(nn.Module):
    """Regression KD: the student's output matches the frozen teacher's, by L1 or mean squared error
    (e.g. an artifact-reduced image or a displacement field; DGKD's L1-to-teacher term)."""

    def __init__(self, norm: str = "l1") -> None:
        super().__init__()
        if norm not in ("l1", "l2"):
            raise ValueError(f"output_match norm {norm!r} is not l1 or l2")
        self.norm = norm

    def forward(self, student_out: Outputs, teacher_out: Outputs, **_extra: Any) -> torch.Tensor:
        s, t = as_scales(student_out)[0].float(), as_scales(teacher_out)[0].detach().float()
        check_same_shape(s, t, "output_match")
        return F.l1_loss(s, t) if self.norm == "l1" else F.mse_loss(s, t)


@DISTILLERS.register("feature_kd")
class FeatureKD(nn.Module):
    """FitNets-style feature KD: ``sum_i w_i * MSE(adapter_i(F_S^i), F_T^i)``.

    Args:
        student_channels, teacher_channels: widths of the paired feature maps (same order).
        spatial_dims: 2 or 3.
        weights: per-pair weights (default equal, summing to 1).

    The 1x1 adapters are trainable and belong to the *student* side: give this module's parameters
    to the student optimizer. Extras: ``student_features`` and ``teacher_features``, each a list
    (or ``{name: tensor}``) of ``B C_i *S_i``. A student map whose size differs from the teacher's is
    resized (linearly) to the teacher's size after the adapter.
    """

    def __init__(
        self,
        student_channels: Sequence[int],
        teacher_channels: Sequence[int],
        spatial_dims: int = 3,
        weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if len(student_channels) != len(teacher_channels):
            raise ValueError(
                f"feature KD pairs {len(student_channels)} student with {len(teacher_channels)} teacher maps"
            )
        n = len(student_channels)
        conv = Conv[Conv.CONV, spatial_dims]
        self.adapters = nn.ModuleList(
            conv(cs, ct, kernel_size=1) for cs, ct in zip(student_channels, teacher_channels, strict=True)
        )
        self.weights = [1.0 / n] * n if weights is None else [float(w) for w in weights]
        self.mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[spatial_dims]

    def forward(
        self,
        student_out: Outputs | None = None,
        teacher_out: Outputs | None = None,
        *,
        student_features: Outputs | Mapping[str, torch.Tensor],
        teacher_features: Outputs | Mapping[str, torch.Tensor],
        **_extra: Any,
    ) -> torch.Tensor:
        fs, ft = as_scales(student_features), as_scales(teacher_features)
        if not len(fs) == len(ft) == len(self.adapters):
            raise ValueError(
                f"feature KD expects {len(self.adapters)} maps each, got {len(fs)} and {len(ft)}"
            )
        total = fs[0].new_zeros(())
        for w, adapter, s, t in zip(self.weights, self.adapters, fs, ft, strict=True):
            s = adapter(s)
            if s.shape[2:] != t.shape[2:]:
                s = F.interpolate(s, size=t.shape[2:], mode=self.mode, align_corners=False)
            total = total + w * F.mse_loss(s.float(), t.detach().float())
        return total


class DistillLoss(nn.Module):
    """Weighted sum of registered distillers, built from the ``distill:`` config section.

    ``DistillLoss({"kd": {"weight": 1.0, "temperature": 4.0}, "cakd": {"weight": 0.5}})``: each key is
    a :data:`~medistill.registry.DISTILLERS` name (or give ``name:`` to use one distiller twice under
    different keys), ``weight`` its factor (default 1), the rest its constructor arguments.

    ``forward(student_out, teacher_out, **extra) -> (total, {key: detached part})``. Trainable
    distiller parameters (feature-KD adapters) are this module's parameters: optimise them with the student.
    """

    def __init__(self, config: Mapping[str, Mapping[str, Any] | None]) -> None:
        super().__init__()
        self.parts = nn.ModuleDict()
        self.weights: dict[str, float] = {}
        for key, spec in config.items():
            kwargs = dict(spec or {})
            self.weights[key] = float(kwargs.pop("weight", 1.0))
            self.parts[key] = DISTILLERS.build(kwargs.pop("name", key), **kwargs)

    def forward(
        self, student_out: Outputs, teacher_out: Outputs, **extra: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        parts = {key: loss(student_out, teacher_out, **extra) for key, loss in self.parts.items()}
        total = sum((self.weights[k] * v for k, v in parts.items()), as_scales(student_out)[0].new_zeros(()))
        return total, {k: v.detach() for k, v in parts.items()}
