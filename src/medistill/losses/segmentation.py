"""Segmentation losses: Dice + CE (softmax, multi-class), Dice + BCE (sigmoid, multi-label), and a
deep-supervision wrapper.

Dice + CE follows nnU-Net (Isensee et al., Nature Methods 2021) and wraps MONAI's ``DiceCELoss``.
Seed C's released code uses Dice alone over all 17 classes with average-pooled soft targets at the
coarse scales (spec C.5.1); we use Dice + CE with nearest-down-sampled hard labels and weights halving per
scale (nnU-Net, spec C.9.10), because pooled soft labels blur small organs and the CE term stabilises
early training. Multi-label masks (overlapping bones of seed D) need a sigmoid head and Dice + BCE.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.losses import DiceCELoss, DiceLoss
from monai.networks.layers.factories import Pool
from torch import nn
from torch.nn import functional as F

from medistill.registry import LOSSES

TARGET_MODES = ("auto", "nearest", "max")


def _as_label_map(target: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """``B *S`` or ``B 1 *S`` integer labels -> ``B 1 *S``."""
    return target.unsqueeze(1) if target.dim() == spatial_dims + 1 else target


@LOSSES.register("dice_ce")
class DiceCE(nn.Module):
    """Soft Dice (softmax) + cross-entropy for mutually exclusive classes.

    ``logits``: ``B K *S``; ``target``: integer labels ``B 1 *S`` or ``B *S`` in ``[0, K)``.
    Dice is computed over the whole batch (``batch=True``, robust when a patch lacks an organ) and by
    default without the background class, as nnU-Net does; CE always covers every class.
    """

    def __init__(
        self,
        include_background: bool = False,
        batch: bool = True,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        smooth: float = 1e-5,
    ) -> None:
        super().__init__()
        self.loss = DiceCELoss(
            include_background=include_background,
            to_onehot_y=True,
            softmax=True,
            batch=batch,
            smooth_nr=smooth,
            smooth_dr=smooth,
            lambda_dice=lambda_dice,
            lambda_ce=lambda_ce,
        )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss(logits, _as_label_map(target, logits.dim() - 2).long())


@LOSSES.register("dice_bce")
class DiceBCE(nn.Module):
    """Soft Dice (per-channel sigmoid) + binary cross-entropy for multi-label (possibly overlapping) masks.

    ``logits``: ``B K *S``; ``target``: masks ``B K *S`` in ``{0, 1}`` (or soft in ``[0, 1]``).
    ``pos_weight`` (``K`` values) up-weights rare foreground in the BCE term.
    """

    def __init__(
        self,
        batch: bool = True,
        lambda_dice: float = 1.0,
        lambda_bce: float = 1.0,
        smooth: float = 1e-5,
        pos_weight: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.dice = DiceLoss(sigmoid=True, batch=batch, smooth_nr=smooth, smooth_dr=smooth)
        self.lambda_dice = lambda_dice
        self.lambda_bce = lambda_bce
        self.register_buffer(
            "pos_weight", None if pos_weight is None else torch.tensor(pos_weight, dtype=torch.float32)
        )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.shape != logits.shape:
            raise ValueError(
                f"dice_bce needs masks shaped like the logits {tuple(logits.shape)}, "
                f"got {tuple(target.shape)}"
            )
        target = target.to(logits.dtype)
        pw = None if self.pos_weight is None else self.pos_weight.view(-1, *[1] * (logits.dim() - 2))
        bce = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pw)
        return self.lambda_dice * self.dice(logits, target) + self.lambda_bce * bce


def downsample_target(target: torch.Tensor, size: Sequence[int], mode: str = "auto") -> torch.Tensor:
    """Resize a label target ``B C *S`` to spatial ``size`` without inventing values.

    ``"nearest"`` picks voxels (integer label maps stay valid labels); ``"max"`` max-pools (a thin
    structure in a binary mask survives down-sampling). ``"auto"``: nearest for a one-channel or integer
    target, max for multi-channel float masks.
    """
    if mode not in TARGET_MODES:
        raise ValueError(f"target mode {mode!r} is not one of {TARGET_MODES}")
    size = tuple(int(s) for s in size)
    if tuple(target.shape[2:]) == size:
        return target
    if mode == "auto":
        mode = "nearest" if target.shape[1] == 1 or not target.is_floating_point() else "max"
    if mode == "max":
        return Pool[Pool.ADAPTIVEMAX, len(size)](size)(target.float()).to(target.dtype)
    return F.interpolate(target.float(), size=size, mode="nearest").to(target.dtype)


def build_loss(spec: nn.Module | str | Mapping[str, Any]) -> nn.Module:
    """A loss from a module, a registry name, or a config ``{"name": ..., **kwargs}``."""
    if isinstance(spec, nn.Module):
        return spec
    if isinstance(spec, str):
        return LOSSES.build(spec)
    kwargs = dict(spec)
    return LOSSES.build(kwargs.pop("name"), **kwargs)


@LOSSES.register("deep_supervision")
class DeepSupervisionLoss(nn.Module):
    """Weighted sum of ``loss`` over deep-supervision outputs ``[full, 1/2, 1/4, ...]``.

    Weights default to ``1, 1/2, 1/4, ...`` normalised to sum 1 (nnU-Net). Each target is down-sampled
    to its output's size by :func:`downsample_target` (never interpolated smoothly). A single tensor
    output (eval mode, or a net without deep supervision) gets the plain loss.

    ``outputs``: ``B K *S`` or a list of ``B K *S_s``; ``target``: ``B 1 *S``/``B *S`` labels or
    ``B K *S`` masks at full resolution.
    """

    multiscale = True  # takes every deep-supervision output

    def __init__(
        self,
        loss: nn.Module | str | Mapping[str, Any] = "dice_ce",
        weights: Sequence[float] | None = None,
        target_mode: str = "auto",
    ) -> None:
        super().__init__()
        if target_mode not in TARGET_MODES:
            raise ValueError(f"target_mode {target_mode!r} is not one of {TARGET_MODES}")
        self.loss = build_loss(loss)
        self.weights = None if weights is None else tuple(float(w) for w in weights)
        self.target_mode = target_mode

    def scale_weights(self, n: int) -> list[float]:
        """Normalised weights for ``n`` scales."""
        w = list(self.weights) if self.weights is not None else [0.5**s for s in range(n)]
        if len(w) < n:
            raise ValueError(f"{n} deep-supervision outputs but only {len(w)} weights {self.weights}")
        total = sum(w[:n])
        return [x / total for x in w[:n]]

    def forward(self, outputs: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            return self.loss(outputs, target)
        spatial_dims = outputs[0].dim() - 2
        target = _as_label_map(target, spatial_dims)
        return sum(
            w * self.loss(out, downsample_target(target, out.shape[2:], self.target_mode))
            for w, out in zip(self.scale_weights(len(outputs)), outputs, strict=True)
        )  # type: ignore[return-value]
