"""Losses of unpaired MR -> CT synthesis beyond CycleGAN's L1 cycle and identity terms (which are the
registered ``l1`` with their weights): the correlation-coefficient constraint and the shape terms.

* ``correlation``: ``1 - r^2`` between the input and the translated image, **per sample** and averaged
  (Ge et al., SPIE MI 2019). The original code took one Pearson r over the whole batch tensor without an
  epsilon (spec E.4, E.8.4): a batch then scores one pooled r, which a single bright slice can dominate.
  ``r^2`` lets MR and CT be anti-correlated (bone: dark in T1, bright in CT). An optional mask restricts r
  to the head, so the background air does not inflate it.
* ``mask_consistency``: L1 between a differentiable body mask of the synthetic CT (a steep sigmoid of
  its HU above a threshold, :func:`soft_threshold`) and the body mask of the input MR; the code's "Self"
  loss, with the synthetic CT fed at the scale the mask was defined on (the original fed ``0..255`` to an
  extractor trained on ``0..1``, spec E.8.3).
* The shape discriminator of the ISBI 2019 paper is a PatchGAN on those masks (real: MR masks, fake:
  soft masks of synthetic CTs), trained with the ``gan`` loss by the task.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from medistill.registry import LOSSES


def pearson_r(
    a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1e-8
) -> torch.Tensor:
    """Pearson correlation of ``a`` and ``b`` (``B *``) per sample, over the voxels of ``mask`` (``B *``,
    weights in [0, 1]; all voxels if None). Returns ``B``."""
    a, b = a.float().flatten(1), b.float().flatten(1)
    w = torch.ones_like(a) if mask is None else mask.float().flatten(1).expand_as(a)
    n = w.sum(1).clamp_min(eps)
    da = a - (w * a).sum(1, keepdim=True) / n[:, None]
    db = b - (w * b).sum(1, keepdim=True) / n[:, None]
    cov = (w * da * db).sum(1)
    var = (w * da * da).sum(1).sqrt() * (w * db * db).sum(1).sqrt()
    return cov / (var + eps)


@LOSSES.register("correlation")
class CorrelationLoss(nn.Module):
    """``mean_b (1 - r_b^2)`` (``sign="any"``, the original's), ``mean_b (1 - r_b)`` (``"positive"``) or
    ``mean_b (1 + r_b)`` (``"negative"``), r per sample (:func:`pearson_r`).

    Why a sign: ``1 - r^2`` is as happy with an MR-like synthetic CT (skull dark, r -> +1) as with an
    inverted one (skull bright, r -> -1), and which of the two a short run falls into depends on the
    seed. In a T1 MR cortical bone is dark and in CT it is the brightest tissue, so for T1 -> CT the
    physically right sign is negative; the loss can say so.

    ``forward(translated, source, mask=None)``: images ``B C H W``; ``mask`` ``B 1 H W`` or None.
    """

    def __init__(
        self,
        sign: Literal["any", "positive", "negative"] = "any",
        squared: bool | None = None,
        eps: float = 1e-8,
    ) -> None:
        super().__init__()
        if squared is not None:  # the earlier spelling: squared=False meant a positive correlation
            sign = "any" if squared else "positive"
        if sign not in ("any", "positive", "negative"):
            raise ValueError(f"correlation: sign={sign!r} is not 'any', 'positive' or 'negative'")
        self.sign, self.eps = sign, eps

    def forward(
        self, translated: torch.Tensor, source: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        r = pearson_r(translated, source, mask, self.eps)
        if self.sign == "any":
            return (1 - r**2).mean()
        return (1 - r).mean() if self.sign == "positive" else (1 + r).mean()


def to_hu(x: torch.Tensor, window_hu: Sequence[float]) -> torch.Tensor:
    """Images in [-1, 1] back to HU of the window ``(lo, hi)`` they were scaled from."""
    lo, hi = float(window_hu[0]), float(window_hu[1])
    return (x + 1) * 0.5 * (hi - lo) + lo


def soft_threshold(hu: torch.Tensor, threshold_hu: float, width_hu: float = 10.0) -> torch.Tensor:
    """``sigmoid((hu - threshold) / width)``: a differentiable mask (0.5 at the threshold, 0.73 one width
    above it); as ``width -> 0`` it becomes ``hu > threshold``."""
    return torch.sigmoid((hu - threshold_hu) / width_hu)


@LOSSES.register("mask_consistency")
class MaskConsistency(nn.Module):
    """L1 between the soft body mask of a synthetic CT and a reference mask (the input MR's head mask).

    Args:
        window_hu: the HU window the CT images were scaled to [-1, 1] from.
        threshold_hu: body threshold (-500 HU: tissue vs air).
        width_hu: sigmoid width of :func:`soft_threshold`.

    ``forward(fake_ct, mask)``: ``B 1 H W`` in [-1, 1] and ``B 1 H W`` in {0, 1}.
    """

    def __init__(
        self,
        window_hu: tuple[float, float] = (-1000.0, 2000.0),
        threshold_hu: float = -500.0,
        width_hu: float = 10.0,
    ) -> None:
        super().__init__()
        self.window_hu, self.threshold_hu, self.width_hu = window_hu, threshold_hu, width_hu

    def soft_mask(self, ct: torch.Tensor) -> torch.Tensor:
        return soft_threshold(to_hu(ct.float(), self.window_hu), self.threshold_hu, self.width_hu)

    def forward(self, fake_ct: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return F.l1_loss(self.soft_mask(fake_ct), mask.float())
