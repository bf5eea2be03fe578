"""Segmentation losses: analytic limits, label-safe down-sampling, deep-supervision weighting."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from medistill.losses import DeepSupervisionLoss, DiceBCE, DiceCE, downsample_target
from medistill.registry import LOSSES

torch.manual_seed(0)


def confident_logits(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """``B *S`` labels -> ``B K *S`` logits that put ~all probability on the true class."""
    return 30.0 * F.one_hot(labels, classes).movedim(-1, 1).float()


def test_registry_holds_the_segmentation_losses() -> None:
    assert {"dice_ce", "dice_bce", "deep_supervision"} <= set(LOSSES.names())


def test_dice_ce_is_zero_for_a_perfect_prediction_and_positive_otherwise() -> None:
    labels = torch.randint(0, 4, (2, 8, 8, 8))
    loss = DiceCE()
    assert loss(confident_logits(labels, 4), labels).item() == pytest.approx(0.0, abs=1e-5)
    logits = torch.zeros(2, 4, 8, 8, 8, requires_grad=True)
    value = loss(logits, labels.unsqueeze(1))  # B 1 *S and B *S both accepted
    assert value.item() > 1.0  # CE of a uniform guess is log 4 = 1.39 alone
    value.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_dice_bce_scores_overlapping_labels_which_softmax_cannot() -> None:
    masks = torch.zeros(1, 2, 8, 8)
    masks[:, 0, 2:6, 2:6] = 1
    masks[:, 1, 4:8, 4:8] = 1  # overlaps channel 0 on 4:6 x 4:6
    assert DiceBCE()(30.0 * (2 * masks - 1), masks).item() == pytest.approx(0.0, abs=1e-5)
    assert DiceBCE(pos_weight=[1.0, 5.0])(torch.zeros(1, 2, 8, 8), masks).item() > 0.5
    with pytest.raises(ValueError, match="shaped like the logits"):
        DiceBCE()(torch.zeros(1, 2, 8, 8), masks[:, :1])


def test_downsample_target_never_invents_labels() -> None:
    labels = torch.randint(0, 3, (1, 1, 16, 16)) * 7  # values {0, 7, 14}: interpolation would give 3.5, 10.5
    small = downsample_target(labels, (4, 4))
    assert small.shape == (1, 1, 4, 4) and small.dtype == labels.dtype
    assert set(small.unique().tolist()) <= {0, 7, 14}
    line = torch.zeros(1, 2, 16, 16)
    line[:, 1, 5, :] = 1  # a one-pixel-thick structure: nearest sampling of rows 0, 4, 8 ... would lose it
    pooled = downsample_target(line, (4, 4))  # auto -> max pool for multi-channel masks
    assert pooled[:, 1].sum() == 4 and pooled[:, 0].sum() == 0
    assert downsample_target(line, (4, 4), "nearest")[:, 1].sum() == 0


def test_deep_supervision_weights_halve_and_normalise() -> None:
    ds = DeepSupervisionLoss("dice_ce")
    assert ds.scale_weights(3) == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    with pytest.raises(ValueError, match="weights"):
        DeepSupervisionLoss("dice_ce", weights=[1.0]).scale_weights(2)


def test_deep_supervision_loss_is_the_weighted_sum_over_scales() -> None:
    labels = torch.randint(0, 3, (2, 16, 16))
    outputs = [torch.randn(2, 3, 16 // 2**s, 16 // 2**s) for s in range(3)]
    ds = LOSSES.build("deep_supervision", loss={"name": "dice_ce", "include_background": True})
    base = ds.loss
    expected = sum(
        w * base(o, downsample_target(labels.unsqueeze(1), o.shape[2:]))
        for w, o in zip(ds.scale_weights(3), outputs, strict=True)
    )
    assert ds(outputs, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    assert ds(outputs[0], labels).item() == pytest.approx(base(outputs[0], labels).item())
    perfect = [
        confident_logits(downsample_target(labels.unsqueeze(1), o.shape[2:])[:, 0], 3) for o in outputs
    ]
    assert ds(perfect, labels).item() == pytest.approx(0.0, abs=1e-5)
